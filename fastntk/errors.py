"""fastntk's exception hierarchy.

Every error fastntk raises on purpose derives from :class:`FastNTKError`, and
also from the built-in exception a Python user would expect (``ValueError``
for bad values, ``TypeError`` for wrong types), so ``except ValueError`` in
calling code keeps working.
"""

from __future__ import annotations


class FastNTKError(Exception):
    """Base class of every error fastntk raises deliberately."""


class InputError(FastNTKError, ValueError):
    """An input tensor is unusable (empty batch, mismatched shapes, ...)."""


class InputTypeError(FastNTKError, TypeError):
    """An input has the wrong type or dtype (e.g. integer images)."""


class OptionError(FastNTKError, ValueError):
    """An option has an unknown or out-of-range value (``bn``, ``method``, ``output``, ...)."""


class ParameterSelectionError(FastNTKError, ValueError):
    """The ``params`` selection is empty or names parameters the model lacks."""


class NonFiniteKernelError(FastNTKError, FloatingPointError):
    """The kernel contains NaN or Inf; the message names the first layer, in forward order,
    whose gradients are not finite."""


class UnsupportedError(FastNTKError, NotImplementedError):
    """The requested computation is not available for this model or machine."""


class ArchitectureError(FastNTKError, ValueError):
    """A search-space architecture (e.g. a NAS-Bench-201 arch string) is malformed."""


class CapturedMutationError(UnsupportedError):
    """torch.func cannot transform a forward that changes a tensor in place which the
    transform does not own (a buffer updated in ``forward``: a running average, a call
    counter). ``ntk``'s layerwise methods then take the batch graph (one backward per sample
    and pass, exact); ``method="vmap"`` and the sketch refuse."""


class UntraceableError(UnsupportedError):
    """torch.func cannot transform the forward: data-dependent control flow (a Python ``if``
    on a tensor's value), ``.item()``, an op without a batching rule, an op with an output
    of data-dependent shape (``nonzero``, boolean masks). ``ntk``'s layerwise methods then
    take the batch graph (one backward per sample and pass, exact, no torch.func);
    ``method="vmap"`` and the sketch refuse, naming the methods that compute the kernel."""


class MergedSamplesError(UnsupportedError):
    """bn="per_sample": a BatchNorm's rows are not the forward's samples (``what`` says
    how); the message gives the advice."""

    def __init__(self, what: str):
        super().__init__(
            f"bn='per_sample' normalises each sample by its own statistics, but {what}: "
            "method='auto', 'loop' or 'vmap' runs each sample alone (exact); the layerwise "
            "methods need bn='eval' or 'batch'"
        )


class OneValuePerChannelError(MergedSamplesError):
    """bn="per_sample": a batched forward gives a BatchNorm one value per channel in each
    row. If the rows are the samples, the per-sample statistics are degenerate; if not (time
    steps as rows, T = N), only a forward of each sample alone can tell: "auto" and "loop"
    take it (and raise the plain :class:`UnsupportedError` where the sample alone has one
    value per channel too)."""

    def __init__(self, module: object, shape: tuple[int, ...]):
        UnsupportedError.__init__(
            self,
            f"bn='per_sample': a {type(module).__name__} gets one value per channel per sample "
            f"(input {shape}); if its rows are the samples, each is normalised to 0 by its own "
            "statistics (PyTorch refuses a train-mode BatchNorm on one such sample): use "
            "bn='eval' (running statistics) or bn='batch'; if they are not (time steps as "
            "rows), method='auto', 'loop' or 'vmap' runs each sample alone",
        )


class JournalError(FastNTKError, OSError):
    """The search journal's database cannot be opened or written, or it holds a damaged
    row (:class:`fastntk.search.Journal`; also importable from :mod:`fastntk.search`)."""


class DistributedError(FastNTKError, RuntimeError):
    """A distributed call (:mod:`fastntk.distributed`) cannot start (no process group and
    no ``torchrun`` environment), its ranks disagree (different inputs), or a rank stopped
    or timed out during it (rerun the same call: an ``out=`` kernel keeps its finished
    tiles)."""


__all__ = [
    "ArchitectureError",
    "DistributedError",
    "CapturedMutationError",
    "FastNTKError",
    "InputError",
    "InputTypeError",
    "JournalError",
    "MergedSamplesError",
    "NonFiniteKernelError",
    "OneValuePerChannelError",
    "OptionError",
    "ParameterSelectionError",
    "UnsupportedError",
    "UntraceableError",
]
