"""The process group a distributed call runs on: ``torch.distributed``, as ``torchrun``
starts it (gloo on CPUs, NCCL with one GPU per rank), errors of a stopped rank turned into
:class:`~fastntk.errors.DistributedError`, and the checks that the ranks agree."""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import hashlib
import os
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from fastntk.errors import DistributedError

# torchrun's environment (c10d rendezvous): what init_process_group("env://") reads
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0


def spawn_local(cmd: Sequence[str], world: int, *, threads: int = 1,
                env: dict[str, str] | None = None) -> list[subprocess.Popen]:  # fmt: skip
    """Start ``cmd`` as ``world`` ranks on this machine with the environment torchrun gives
    them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, a free ``MASTER_PORT`` on 127.0.0.1),
    ``threads`` OpenMP threads each and ``env`` on top; stdout and stderr piped as text.
    For tests and benchmarks that drive the ranks themselves (users: torchrun, or
    ``fastntk ... --workers W``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        e = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", **(env or {})}  # fmt: skip
        procs.append(subprocess.Popen(list(cmd), env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    return procs


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    device: torch.device  # this rank's device: cuda:LOCAL_RANK under NCCL, else the CPU
    backend: str


def join(timeout: float | None = None) -> Group:
    """The default process group: the caller's where it has initialised one, else one
    initialised from torchrun's environment (gloo, or NCCL where CUDA is available; each
    rank on GPU ``LOCAL_RANK``) with collectives that give up after ``timeout`` seconds
    (default 600)."""
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise DistributedError(
                "no process group and no torchrun environment (missing "
                f"{', '.join(missing)}): start the program with torchrun, e.g. "
                "`torchrun --nproc-per-node=2 your_script.py`, or call "
                "torch.distributed.init_process_group() before fastntk.distributed"
            )
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout or DEFAULT_TIMEOUT_S),
        )
        # ours to close: a gloo group left to the interpreter's shutdown aborts the process
        # ("terminate called without an active exception") where its threads outlive it
        atexit.register(_close)
    backend = dist.get_backend()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    return Group(dist.get_rank(), dist.get_world_size(), device, backend)


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Errors of a collective whose peer stopped (connection closed) or timed out, as a
    :class:`DistributedError` naming ``what`` the ranks were doing."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, dist.DistBackendError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"a rank stopped or timed out during {what} ({first[:200]}); rerun the same "
            "call on every rank (a kernel written to out= keeps its finished tiles)"
        ) from e


def digest(*tensors: torch.Tensor | None) -> str:
    """A hash of the tensors' shapes, dtypes and values (the ranks' inputs must agree)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        c = t.detach().cpu().contiguous()
        h.update(f"{tuple(c.shape)}{c.dtype}".encode())
        h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()


def agree(g: Group, what: str, value: str) -> None:
    """Raise on every rank where the ranks' ``value`` (a digest of ``what``) differ."""
    values: list[str | None] = [None] * g.world
    with collective(f"the check of {what}"):
        dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        odd = [r for r, v in enumerate(values) if v != values[0]]
        raise DistributedError(
            f"the ranks were given different {what} (rank 0 and rank(s) "
            f"{', '.join(map(str, odd))} differ): every rank must pass the same"
        )


def rank0_model(g: Group, model: nn.Module) -> nn.Module:
    """A copy of ``model`` on this rank's device holding rank 0's parameters and buffers
    (broadcast), so the ranks compute one model; the caller's model is not changed."""
    m = copy.deepcopy(model).to(g.device)
    if g.world > 1:
        with collective("the broadcast of rank 0's parameters and buffers"), torch.no_grad():
            for t in [*m.parameters(), *m.buffers()]:
                dist.broadcast(t.data, src=0)
    return m
