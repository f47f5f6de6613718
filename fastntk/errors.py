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


class JournalError(FastNTKError, OSError):
    """The search journal's database cannot be opened or written, or it holds a damaged
    row (:class:`fastntk.search.Journal`; also importable from :mod:`fastntk.search`)."""


__all__ = [
    "ArchitectureError",
    "FastNTKError",
    "InputError",
    "InputTypeError",
    "JournalError",
    "NonFiniteKernelError",
    "OptionError",
    "ParameterSelectionError",
    "UnsupportedError",
]
