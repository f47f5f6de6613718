"""fastntk metrics as zero-cost-nas / NASLib measures.

zero-cost-nas (Abdelfattah et al.) and NASLib call a measure as
``measure(net, inputs, targets, split_data=1, loss_fn=None) -> float``.
:func:`measure` turns any fastntk metric into such a function::

    from fastntk.adapters import measure, MEASURES
    lga = measure("lga")
    score = lga(net, inputs, targets)          # a float
    MEASURES["cond"](net, inputs, targets, split_data=2)

``split_data`` keeps its zero-cost-nas meaning of "process the batch in this
many pieces to save memory": the kernel is still the exact kernel of the
whole batch, computed in ``ceil(N / split_data)``-sample chunks (the engine's
``chunk_size``). When a computation runs out of memory (``torch.OutOfMemoryError``
or a RuntimeError whose message contains "out of memory"), it is retried with
``split_data`` doubled, until the chunks are single samples.

``loss_fn`` is accepted for signature compatibility and ignored (NTK metrics
do not use a loss). The network is left unchanged: parameters, buffers
(BatchNorm running statistics) and train/eval flags are restored.
Keyword options of :func:`fastntk.metrics.compute_metrics` (``bn``,
``params``, ``output``, ...) can be bound with ``measure(name, **options)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from fastntk.errors import OptionError
from fastntk.metrics import METRICS, compute_metrics

__all__ = ["MEASURES", "Measure", "is_oom", "measure"]

Measure = Callable[..., float]


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (CUDA or CPU)."""
    oom_cls = getattr(torch, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(e, oom_cls):
        return True
    msg = str(e).lower()
    # CPU: PyTorch's allocator raises RuntimeError("[enforce fail ...] DefaultCPUAllocator:
    # can't allocate memory: you tried to allocate ... bytes")
    return isinstance(e, MemoryError) or isinstance(e, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg
    )


def _snapshot(net: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    # Buffers (BatchNorm running statistics, num_batches_tracked) and train/eval flags:
    # what a train-mode forward of an interrupted attempt can change. Parameters are
    # never written by the NTK computation, so they are not copied (no 2x memory).
    state = {k: v.detach().clone() for k, v in net.named_buffers()}
    modes = {name: m.training for name, m in net.named_modules()}
    return state, modes


def _restore(net: nn.Module, snap: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    state, modes = snap
    with torch.no_grad():
        for k, v in net.named_buffers():
            if k in state and not torch.equal(v, state[k]):
                v.copy_(state[k])
    for name, m in net.named_modules():
        if name in modes:
            m.training = modes[name]


def measure(name: str, **options: Any) -> Measure:
    """A zero-cost-nas measure computing the fastntk metric ``name``.

    Args:
        name: a key of :data:`fastntk.metrics.METRICS`.
        **options: keyword options of :func:`fastntk.metrics.compute_metrics`.

    Returns:
        ``fn(net, inputs, targets, split_data=1, loss_fn=None) -> float``.

    Raises:
        OptionError: unknown metric.
    """
    if name not in METRICS:
        raise OptionError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")

    def fn(net: nn.Module, inputs: torch.Tensor, targets: Any = None, split_data: int = 1,
           loss_fn: Any = None) -> float:
        if not isinstance(split_data, int) or split_data < 1:
            raise OptionError(f"split_data must be a positive integer, got {split_data!r}")
        n = int(inputs.shape[0])
        split = min(split_data, max(n, 1))
        snap = _snapshot(net)
        try:
            while True:
                chunk = None if split == 1 else math.ceil(n / split)
                try:
                    kw = dict(options)
                    if chunk is not None:
                        kw["chunk_size"] = chunk
                    return float(compute_metrics(net, inputs, targets, [name], **kw)[name])
                except Exception as e:
                    if not is_oom(e) or split >= n:
                        raise
                    _restore(net, snap)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    split = min(2 * split, n)
        finally:
            _restore(net, snap)

    fn.__name__ = f"fastntk_{name}"
    fn.__qualname__ = fn.__name__
    fn.__doc__ = (f"zero-cost-nas measure: fastntk metric {name!r} "
                  f"({METRICS[name].doc}); higher_is_better={METRICS[name].higher_is_better}")
    return fn


MEASURES: dict[str, Measure] = {name: measure(name) for name in METRICS}
"""One measure per fastntk metric, with default options."""
