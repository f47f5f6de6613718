"""Where the time of an NTK goes: phase timings of fastntk calls.

Usage::

    with fastntk.profile() as prof:
        theta = fastntk.ntk(model, x, output="trace")
    print(prof.table())           # seconds per phase, share of the total
    prof.gram_tflops              # achieved TFLOP/s of the Gram GEMMs

Phases (exclusive: a phase nested in another is not counted twice):

* ``probe``: one more forward of one to three samples (two with a retry, or for models
  with parameters broadcast over the batch) measuring where each module call's tensors
  hold the samples (``fastntk.engine.probe``), once per call of the layerwise paths;
* ``forward``: the model's forward pass(es) with the engine's hooks;
* ``backward``: autograd's backward passes (output gradients of every layer);
* ``per_sample``: the Gram rules turning (layer input, output gradient) into
  per-sample gradient blocks;
* ``fallback``: torch.func per-sample gradients of modules without a rule;
* ``gram``: the Gram GEMMs Θ += G Gᵀ (and the Jacobian contractions of the
  ``vmap``/coupled paths);
* ``jacobian``: per-sample Jacobians of the ``vmap`` method and the coupled
  (``bn="batch"``) path;
* ``sketch``: hashing per-sample gradients into the sketch (``ntk_sketch``).

``gram_flops`` counts 2·n_A·n_B·c for every (n_A × c)·(c × n_B) product the Gram
step issues (the GEMM convention; the symmetric Triton kernel executes about half
of it). On a GPU the phases are synchronised with ``torch.cuda.synchronize()``
at every boundary (``sync=True``, the default), which costs a little time but
makes the split meaningful; without a profile active the engine does none of this.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fastntk.errors import OptionError

PHASES = ("probe", "forward", "backward", "per_sample", "fallback", "gram", "jacobian", "sketch")

_current: Profile | None = None


@dataclass
class Profile:
    """Timings collected by :func:`profile`."""

    sync: bool = True
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    gram_flops: float = 0.0
    total_s: float = 0.0
    _stack: list[list] = field(default_factory=list)  # [phase, resumed_at]

    @property
    def gram_tflops(self) -> float:
        """Achieved TFLOP/s of the Gram step (0.0 when it took no measurable time)."""
        s = self.seconds.get("gram", 0.0)
        return self.gram_flops / s / 1e12 if s > 0 else 0.0

    @property
    def other_s(self) -> float:
        """Time inside the profiled block spent outside every phase (set-up, Python)."""
        return max(0.0, self.total_s - sum(self.seconds.values()))

    def as_dict(self) -> dict[str, float]:
        d = {f"{p}_s": self.seconds.get(p, 0.0) for p in PHASES}
        d.update(
            other_s=self.other_s,
            total_s=self.total_s,
            gram_flops=self.gram_flops,
            gram_tflops=self.gram_tflops,
        )
        return d

    def table(self) -> str:
        """A markdown table: seconds and share of the total per phase."""
        lines = ["| phase | seconds | share |", "|---|---|---|"]
        tot = self.total_s or 1.0
        for p in (*PHASES, "other"):
            s = self.other_s if p == "other" else self.seconds.get(p, 0.0)
            if s > 0:
                lines.append(f"| {p} | {s:.4f} | {100 * s / tot:.1f}% |")
        lines.append(f"| total | {self.total_s:.4f} | 100% |")
        if self.gram_flops:
            lines.append(
                f"\nGram: {self.gram_flops / 1e9:.2f} GFLOP at {self.gram_tflops:.3f} TFLOP/s"
            )
        return "\n".join(lines)

    def _sync(self) -> None:
        if self.sync and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


@contextmanager
def profile(sync: bool = True) -> Iterator[Profile]:
    """Collect phase timings of every fastntk call inside the ``with`` block.

    Args:
        sync: synchronise CUDA at phase boundaries (needed for GPU timings to mean
            anything; no effect on the CPU).

    Raises:
        OptionError: a profile is already active (they do not nest).
    """
    global _current
    if _current is not None:
        raise OptionError("fastntk.profile() is already active; profiles do not nest")
    prof = Profile(sync=sync)
    prof._sync()
    t0 = time.perf_counter()
    _current = prof
    try:
        yield prof
    finally:
        prof._sync()
        prof.total_s = time.perf_counter() - t0
        _current = None


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the time of the block to ``name`` (engine-internal; free when not profiling)."""
    prof = _current
    if prof is None:
        yield
        return
    prof._sync()
    now = time.perf_counter()
    if prof._stack:  # pause the enclosing phase
        outer = prof._stack[-1]
        prof.seconds[outer[0]] += now - outer[1]
    prof._stack.append([name, now])
    try:
        yield
    finally:
        prof._sync()
        now = time.perf_counter()
        top = prof._stack.pop()
        prof.seconds[top[0]] += now - top[1]
        if prof._stack:
            prof._stack[-1][1] = now


def count_gram(n_a: int, n_b: int, cols: int) -> None:
    """Record one (n_a x cols) @ (cols x n_b) product of the Gram step."""
    prof = _current
    if prof is not None:
        prof.gram_flops += 2.0 * n_a * n_b * cols
