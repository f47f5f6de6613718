"""Numeric arguments: one check for seeds, sizes, counts and real-valued options across
the package."""

from __future__ import annotations

import math
import numbers
from typing import Any

from fastntk.errors import OptionError


def is_int(value: Any) -> bool:
    """An integer (numpy integers too), not a bool, float or string."""
    return not isinstance(value, bool) and hasattr(value, "__index__")


def integer(value: Any, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi)`` (either bound optional); OptionError otherwise."""
    v = int(value.__index__()) if is_int(value) else None
    if v is None or (lo is not None and v < lo) or (hi is not None and v >= hi):
        if hi is not None:
            top = f"2**{hi.bit_length() - 1}" if hi > 2**32 and hi & (hi - 1) == 0 else str(hi)
            bounds = f" in [{lo}, {top})"
        else:
            bounds = f" >= {lo}" if lo is not None else ""
        raise OptionError(f"{what} must be an int{bounds}, got {value!r} ({type(value).__name__})")
    return v


def real(value: Any, what: str, lo: float = 0.0, *, strict: bool = False) -> float:
    """``value`` as a float ``>= lo`` (``> lo`` if ``strict``): a finite real number (numpy
    floats too), not a bool, string, NaN or infinity; OptionError otherwise."""
    if (
        isinstance(value, bool) or not isinstance(value, numbers.Real)
        or not (value > lo if strict else value >= lo) or not math.isfinite(value)
    ):  # fmt: skip
        raise OptionError(f"{what} must be a finite number {'>' if strict else '>='} {lo:g}, "
                          f"got {value!r}")  # fmt: skip
    return float(value)
