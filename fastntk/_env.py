"""What this machine offers fastntk (C++ extension, Triton, CUDA), and why not.

:func:`env` never raises: every probe is guarded and reports its failure as a string.
"""

from __future__ import annotations

import os

import torch


def _triton_probe() -> tuple[bool, str | None, bool, str | None]:
    """(importable, version, runnable, error)."""
    try:
        import triton
    except Exception as exc:
        return False, None, False, f"triton is not importable ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", None)
    interp = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    if interp:
        return True, version, True, None
    try:
        has_gpu = torch.cuda.is_available()
    except Exception as exc:
        return True, version, False, f"CUDA probe failed ({type(exc).__name__}: {exc})"
    if not has_gpu:
        return True, version, False, "no CUDA GPU is visible and TRITON_INTERPRET is not set to 1"
    return True, version, True, None


def env() -> dict[str, object]:
    """Describe the compute environment.

    Returns:
        dict with keys ``csrc`` (bool: ``fastntk._C`` loaded), ``csrc_error`` (str or None),
        ``triton`` (bool: importable), ``triton_version``, ``triton_runnable`` (bool: a GPU,
        or ``TRITON_INTERPRET=1`` for CPU tensors), ``triton_error`` (str or None), ``cuda``
        (bool), ``device_name`` (GPU name or None), ``torch_version``, ``num_threads``.
    """
    from . import _ext

    try:
        csrc = _ext.available()
        csrc_error = _ext.why_not()
    except Exception as exc:  # never let a probe break the caller
        csrc, csrc_error = False, f"{type(exc).__name__}: {exc}"
    triton_ok, triton_version, triton_runnable, triton_error = _triton_probe()
    try:
        cuda = bool(torch.cuda.is_available())
        device_name = torch.cuda.get_device_name(0) if cuda else None
    except Exception:
        cuda, device_name = False, None
    return {
        "csrc": csrc,
        "csrc_error": csrc_error,
        "triton": triton_ok,
        "triton_version": triton_version,
        "triton_runnable": triton_runnable,
        "triton_error": triton_error,
        "cuda": cuda,
        "device_name": device_name,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
    }


__all__ = ["env"]
