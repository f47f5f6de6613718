"""Architecture scoring over the ranks of a ``torch.distributed`` process group.

``fastntk search|evaluate`` started by ``torchrun --nproc-per-node=W -m fastntk ...`` (or
with ``--workers W``, which starts the same through torch's launcher): rank 0 runs the
algorithm and alone writes the journal; every rank, rank 0 too, scores a share of each
batch of architectures the algorithm asks for (:meth:`ParallelScorer.map` over a
:class:`Pool`: architecture ``i`` of a batch on rank ``i mod W``), with the scorer each rank built from the same
options, so a score is the one a single process computes (same data, same seeded
weights). The algorithms ask for batches as wide as the ranks (``Scorer.width``):

* random search and ``evaluate``: the draws one process makes, W at a time: the same
  architectures and scores as one process with the same seed;
* pruning: each round's candidates together: the same rounds as one process;
* regularised evolution and REINFORCE: batch-synchronous: W children of the same
  population (W tournaments), or W samples of the same policy, scored together, then
  taken in one at a time. With W > 1 their trajectory differs from one process's (it is
  that of a population or policy updated every W evaluations); with W = 1 it is the same.

Every result is journaled by rank 0 as soon as its batch returns: killing any rank stops
the others (the collective fails; :class:`~fastntk.errors.DistributedError`), and
rerunning the command resumes from the journal with no journaled evaluation lost or
repeated (a batch that had not returned is scored again).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastntk.search.scorer import Scorer

# torchrun's variables: a command started by it (WORLD_SIZE > 1) scores over its ranks
_RANKED = ("RANK", "WORLD_SIZE")


def ranked() -> bool:
    """Whether this process is one rank of several started by torchrun."""
    return all(k in os.environ for k in _RANKED) and int(os.environ["WORLD_SIZE"]) > 1


class Pool:
    """``fn`` over the ranks of the process group: :meth:`map` on rank 0 gives every rank
    (rank 0 too) a share of the items, item ``i`` to rank ``i mod W``; the other ranks run
    :func:`serve` with the same ``fn``. Items and results travel pickled."""

    def __init__(self, fn: Callable[[Any], Any], timeout: float | None = None):
        from fastntk.distributed import join

        self.fn = fn
        self.group = join(timeout)
        self.width = self.group.world

    def map(self, items: Sequence[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, computed over the ranks; the first item whose
        ``fn`` raised raises its error here."""
        import torch.distributed as dist

        from fastntk.distributed.group import collective

        items = list(items)
        if not items:
            return []
        with collective("a batch on the workers"):
            dist.broadcast_object_list([("map", items)], src=0)
            mine = _share(self.fn, items, 0, self.width)
            parts: list[Any] = [None] * self.width
            dist.gather_object(mine, parts, dst=0)
        out: dict[int, Any] = {}
        for part in parts:
            out.update(part)
        results = [out[i] for i in range(len(items))]
        for r in results:
            if isinstance(r, _Raised):
                raise r.error  # a worker's error (an unknown arch, a bad option)
        return results

    def close(self) -> None:
        """Release the other ranks from :func:`serve`."""
        import torch.distributed as dist

        from fastntk.distributed.group import collective

        with collective("releasing the workers"):
            dist.broadcast_object_list([("stop", None)], src=0)


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def _share(fn, items: list[Any], rank: int, world: int) -> dict[int, Any]:
    """{index: fn(item), or the error it raised} of this rank's share of a batch."""
    out: dict[int, Any] = {}
    for i in range(rank, len(items), world):
        try:
            out[i] = fn(items[i])
        except Exception as e:  # noqa: BLE001 - handed to rank 0, which raises it
            out[i] = _Raised(e)
    return out


def serve(fn: Callable[[Any], Any], timeout: float | None = None) -> None:
    """A worker rank (not 0): ``fn`` on its share of each batch rank 0's :class:`Pool`
    sends, until rank 0 releases it (:meth:`Pool.close`)."""
    import torch.distributed as dist

    from fastntk.distributed import join
    from fastntk.distributed.group import collective

    g = join(timeout)
    while True:
        box: list[Any] = [None]
        with collective("waiting for rank 0's next batch"):
            dist.broadcast_object_list(box, src=0)
        verb, items = box[0]
        if verb == "stop":
            return
        mine = _share(fn, items, g.rank, g.world)
        with collective("returning results to rank 0"):
            dist.gather_object(mine, None, dst=0)


def timed(scorer: Scorer) -> Callable[[Any], tuple[dict[str, float], float]]:
    """``arch -> (scorer(arch), seconds)``: what the ranks of a :class:`ParallelScorer`
    compute (:func:`serve` it on the other ranks)."""

    def fn(arch: Any) -> tuple[dict[str, float], float]:
        t = time.monotonic()
        return scorer(arch), time.monotonic() - t

    return fn


class ParallelScorer(Scorer):
    """``scorer`` on every rank of the process group (rank 0: this object; the others:
    ``serve(timed(scorer))``): :meth:`map` scores a batch over them."""

    def __init__(self, scorer: Scorer, timeout: float | None = None):
        self.__dict__.update(scorer.__dict__)  # metrics, directions, settings, fn
        self.inner = scorer
        self.pool = Pool(timed(scorer), timeout)
        self.width = self.pool.width

    def __call__(self, arch: Any) -> dict[str, float]:
        return self.inner(arch)

    def map(self, archs: Sequence[Any]) -> list[tuple[dict[str, float], float]]:
        return self.pool.map(archs)

    def close(self) -> None:
        self.pool.close()


def launch(argv: Sequence[str], workers: int) -> int:
    """Run the command ``argv`` (``fastntk``'s arguments, without ``--workers``) on
    ``workers`` ranks of this machine through torch's launcher (``torchrun --standalone``);
    returns its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={workers}", "-m", "fastntk", *argv]  # fmt: skip
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")  # (torchrun's own default for several ranks)
    return subprocess.call(cmd, env=env)
