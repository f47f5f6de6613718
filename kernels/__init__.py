"""Triton kernels of fastntk, installed as ``fastntk.kernels``.

Each module holds a pure-PyTorch reference, the ``@triton.jit`` kernel and a
launcher that checks shapes. Importing this package never fails when Triton
is missing: :data:`TRITON_AVAILABLE` says whether the kernels can be imported,
:func:`triton_runnable` whether they can run here, and :func:`why_not` why not.
"""

from __future__ import annotations

import os
import re

try:  # Triton is optional: the package works without it.
    import triton  # noqa: F401

    TRITON_AVAILABLE: bool = True
    TRITON_VERSION: str | None = getattr(triton, "__version__", None)
    _IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install raising anything else
    TRITON_AVAILABLE = False
    TRITON_VERSION = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run on CPU tensors in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _version(text: str | None) -> tuple[int, ...]:
    """Leading numeric parts of a version string: ``"3.6.0+git"`` -> ``(3, 6, 0)``."""
    parts = []
    for piece in (text or "").split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def _interpreter_incompatibility() -> str | None:
    """Why Triton's interpreter cannot run with the NumPy installed, or ``None``.

    Triton <= 3.6's interpreter turns scalar kernel arguments into 1-element arrays and
    takes ``int()`` of them (in ``range(0, P, BLOCK)``, say), which NumPy 2.4 turned from a
    deprecation into a ``TypeError``; Triton 3.7 squeezes the array first. Compiled kernels
    on a GPU are unaffected.
    """
    try:
        import numpy
    except ImportError:
        return "Triton's interpreter needs NumPy, which is not installed"
    if _version(TRITON_VERSION)[:2] <= (3, 6) and _version(numpy.__version__)[:2] >= (2, 4):
        return (
            f"Triton {TRITON_VERSION}'s interpreter fails with NumPy {numpy.__version__} "
            "(scalar kernel arguments cannot be converted; fixed in Triton 3.7): install "
            "'numpy<2.4' or 'triton>=3.7' to run the kernels with TRITON_INTERPRET=1"
        )
    return None


def why_not(device: object | None = None) -> str | None:
    """Say why the Triton kernels cannot run, or ``None`` when they can.

    Args:
        device: the device the tensors live on (``torch.device`` or string); ``None``
            asks whether they can run anywhere on this machine.
    """
    if not TRITON_AVAILABLE:
        return f"triton is not importable ({_IMPORT_ERROR})"
    import torch

    if interpreter_enabled():
        if device is not None and torch.device(device).type != "cpu":
            return "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
        return _interpreter_incompatibility()
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible and TRITON_INTERPRET is not set to 1"
    if device is not None and torch.device(device).type != "cuda":
        return (
            f"tensors are on {torch.device(device).type}; Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 with CPU tensors)"
        )
    return None


def triton_runnable(device: object | None = None) -> bool:
    """True when the kernels can run on ``device`` (see :func:`why_not`)."""
    return why_not(device) is None


__all__ = [
    "TRITON_AVAILABLE",
    "TRITON_VERSION",
    "interpreter_enabled",
    "triton_runnable",
    "why_not",
]
