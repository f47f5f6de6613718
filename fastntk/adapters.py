"""fastntk metrics as zero-cost-nas / NASLib measures.

:func:`measure` turns any fastntk metric into a function
``fn(net, inputs, targets, split_data=1, loss_fn=None) -> float``::

    from fastntk.adapters import measure, MEASURES, TENAS
    lga = measure("lga")
    score = lga(net, inputs, targets)          # a float
    MEASURES["cond"](net, inputs, targets, split_data=2)
    tenas = measure("ncn", **TENAS)            # TE-NAS's -cond, exactly (see TENAS)

To register one in NASLib's or zero-cost-nas's own registry (their ``find_measures``
looks measures up by name, calls them as ``fn(net, inputs, targets, loss_fn=...,
split_data=...)`` on a copy of the network, and sums the returned list of tensors), use
:func:`register`::

    from naslib.predictors.utils.pruners import measures   # or foresight.pruners.measures
    fastntk.adapters.register(measures, "ncn", as_name="fastntk_ncn", **fastntk.adapters.TENAS)

``split_data`` keeps its zero-cost-nas meaning of "process the batch in this
many pieces to save memory": the kernel is still the exact kernel of the
whole batch, computed in ``ceil(N / split_data)``-sample chunks (the engine's
``chunk_size``). When a computation runs out of memory (``torch.OutOfMemoryError``
or a RuntimeError whose message contains "out of memory"), the measure retries it
with ``split_data`` doubled, until the chunks are single samples (the harnesses
also retry out-of-memory errors themselves, with the next divisor of N).

``loss_fn`` is accepted for signature compatibility and ignored (NTK metrics
do not use a loss). The network is left unchanged: parameters, buffers
(BatchNorm running statistics) and train/eval flags are restored.
Keyword options of :func:`fastntk.metrics.compute_metrics` (``bn``,
``params``, ``output``, ...) can be bound with ``measure(name, **options)``; they are
checked when the measure is made. Unbound options take the NAS preset
:data:`fastntk.metrics.NAS` (per-sample BatchNorm statistics: the mode whose kernels
predicted NAS-Bench-201 accuracy, ``bench/results/nb201_space.md``), not the engine's
``bn="eval"``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from fastntk import _args
from fastntk.errors import InputTypeError, OptionError
from fastntk.metrics import METRICS, NAS, compute_metrics

__all__ = ["MEASURES", "Measure", "TENAS", "is_oom", "measure", "register"]

Measure = Callable[..., float]

TENAS: dict[str, Any] = {
    "bn": "batch",
    "params": lambda name, p: "weight" in name,
}
"""The options under which ``measure("ncn", **TENAS)`` is TE-NAS's ``-cond``
(VITA-Group/TENAS ``lib/procedures/ntk.py``, ``get_ntk_n``): BatchNorm in train mode over
the whole batch (one forward, samples coupled), the gradient of the sum of the logits,
and only the parameters whose name contains "weight" (convolutions, BatchNorm gammas and
the classifier's weight; biases and BatchNorm betas left out). fastntk's NAS defaults
(:data:`fastntk.metrics.NAS`: per-sample BatchNorm, every parameter) give another kernel,
and rank architectures differently."""

_BOUND_BY_THE_MEASURE = ("model", "x", "y", "names")


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (CUDA or CPU)."""
    oom_cls = getattr(torch, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(e, oom_cls):
        return True
    msg = str(e).lower()
    # CPU: PyTorch's allocator raises RuntimeError("[enforce fail ...] DefaultCPUAllocator:
    # can't allocate memory: you tried to allocate ... bytes")
    return (
        isinstance(e, MemoryError)
        or isinstance(e, RuntimeError)
        and ("out of memory" in msg or "can't allocate memory" in msg)
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


def _check_values(options: dict[str, Any]) -> None:
    """The options' values, checked when the measure is made (not at a harness's first
    call, where an error stops the whole run)."""
    from fastntk import _model
    from fastntk.engine.options import METHODS, parse_chunk_size
    from fastntk.metrics.model_kernels import ntk_kwargs
    from fastntk.metrics.registry import check_errors

    output, bn = options.get("output", "sum"), options.get("bn", "eval")
    _model.check_options(output, bn, "auto", METHODS)  # the engine's check of both
    ntk_kwargs(bn, None, output, None, None)  # the metrics' own (no output="full")
    if options.get("chunk_size") is not None:
        parse_chunk_size(options["chunk_size"])
    check_errors(options.get("errors", "raise"))
    _model.check_progress(options.get("progress"))


def _split_chunk(chunk: int, bound: Any) -> Any:
    """split_data's chunk, within a chunk_size bound to the measure (samples, or
    (samples, columns)): the smaller number of samples."""
    if isinstance(bound, tuple) and len(bound) == 2:
        return (min(chunk, bound[0]), bound[1]) if _args.is_int(bound[0]) else bound
    return min(chunk, bound) if _args.is_int(bound) else chunk


def measure(name: str, **options: Any) -> Measure:
    """A zero-cost-nas measure computing the fastntk metric ``name``.

    Args:
        name: a key of :data:`fastntk.metrics.METRICS`.
        **options: keyword options of :func:`fastntk.metrics.compute_metrics`; the ones
            not given take the NAS preset :data:`fastntk.metrics.NAS`.

    Returns:
        ``fn(net, inputs, targets, split_data=1, loss_fn=None) -> float``.

    Raises:
        OptionError: unknown metric, or options :func:`compute_metrics` does not take.
    """
    if name not in METRICS:
        raise OptionError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    taken = [k for k in options if k in _BOUND_BY_THE_MEASURE]
    if taken:
        raise OptionError(f"measure() binds {', '.join(taken)} itself (the harness passes the "
                          "network, inputs and targets; the metric is the name)")  # fmt: skip
    try:
        inspect.signature(compute_metrics).bind_partial(**options)
    except TypeError as e:
        raise OptionError(f"measure({name!r}, ...): {e} (options of "
                          "fastntk.metrics.compute_metrics)") from None  # fmt: skip
    if METRICS[name].kind == "features" and "blocks" not in options:
        raise OptionError(f"measure({name!r}) needs blocks=: the names of the submodules whose "
                          "outputs it measures, as named_modules() gives them")  # fmt: skip
    options = {**NAS, **options}
    _check_values(options)
    bound_chunk = options.get("chunk_size")

    def fn(
        net: nn.Module,
        inputs: torch.Tensor,
        targets: Any = None,
        split_data: int = 1,
        loss_fn: Any = None,
    ) -> float:
        split_data = _args.integer(split_data, "split_data", 1)
        if not isinstance(inputs, torch.Tensor):
            raise InputTypeError(f"inputs must be a torch.Tensor batch (N, ...), got "
                                 f"{type(inputs).__name__}")  # fmt: skip
        n = int(inputs.shape[0]) if inputs.dim() else 0
        split = min(split_data, max(n, 1))
        snap = _snapshot(net)
        try:
            while True:
                chunk = None if split == 1 else math.ceil(n / split)
                try:
                    kw = {"progress": False, **options}
                    if chunk is not None:
                        kw["chunk_size"] = _split_chunk(chunk, bound_chunk)
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
    fn.__doc__ = (
        f"zero-cost-nas measure: fastntk metric {name!r} "
        f"({METRICS[name].doc}); higher_is_better={METRICS[name].higher_is_better}"
    )
    return fn


def register(
    measures: Any,
    name: str,
    *,
    as_name: str | None = None,
    copy_bn: bool = True,
    impl_args: dict[str, Any] | None = None,
    **options: Any,
) -> str:
    """Register the fastntk metric ``name`` in a zero-cost-nas / NASLib measure registry.

    ``measures`` is their ``measures`` package (``naslib.predictors.utils.pruners.measures``
    or ``foresight.pruners.measures``): its ``measure(name, bn=..., **impl_args)``
    decorator registers a function that their ``find_measures`` calls as
    ``fn(net, inputs, targets, loss_fn=..., split_data=...)`` on a copy of the network
    (their ``bn=False``, ``copy_bn=False`` here, makes the copy's BatchNorms identities)
    and whose result it sums as a list of tensors. ``options`` are :func:`measure`'s
    (``bn`` among them: ``register(measures, "ncn", **TENAS)``). The registered function returns ``[tensor(score)]`` and takes (and
    ignores) the registry's extra arguments (``impl_args``, handed to their decorator).
    Unlike the measure from :func:`measure`, an architecture whose metric is undefined
    (a constant kernel) scores NaN instead of raising (``errors="nan"``, which a binding
    in ``options`` overrides): their harness stops at the first error.

    Returns:
        the registered name (``as_name``, default ``"fastntk_" + name``).
    """
    if not callable(getattr(measures, "measure", None)):
        raise OptionError("register() needs the measures package of zero-cost-nas or NASLib "
                          "(it has a measure(name, bn=...) decorator)")  # fmt: skip
    # copy_bn=False: the harness's copy has identity BatchNorms (their forward set on the
    # instance), which per-sample statistics would have to replace: no BN mode applies, and
    # "eval" runs them as set
    fn = measure(name, **{"errors": "nan", **({} if copy_bn else {"bn": "eval"}), **options})
    key = as_name or f"fastntk_{name}"

    def harness_fn(net, inputs, targets=None, *args: Any, loss_fn: Any = None,
                   split_data: int = 1, **impl_args: Any) -> list[torch.Tensor]:  # fmt: skip
        return [torch.tensor(fn(net, inputs, targets, split_data=split_data), dtype=torch.float64)]

    harness_fn.__name__ = key
    measures.measure(key, bn=bool(copy_bn), **(impl_args or {}))(harness_fn)
    return key


# (the block features, feature_entropy and block_trainability, are not among them: they
# need the blocks of the harness's network, measure("feature_entropy", blocks=[names]))
MEASURES: dict[str, Measure] = {
    name: measure(name) for name, spec in METRICS.items() if spec.kind != "features"
}
"""One measure per fastntk metric, with the NAS preset :data:`fastntk.metrics.NAS` (not
TE-NAS's options: see :data:`TENAS`)."""
