"""What this machine offers fastntk (C++ extension, Triton, CUDA), and why not.

:func:`env` never raises: every probe is guarded and reports its failure as a string.
"""

from __future__ import annotations

import ctypes
import platform

import torch


def _triton_probe() -> tuple[bool, str | None, bool, str | None]:
    """(importable, version, runnable, error): what :mod:`fastntk.kernels` says."""
    try:
        from fastntk import kernels
    except Exception as exc:  # a source tree used without installing: kernels/ not mapped
        return (
            False,
            None,
            False,
            f"fastntk.kernels is not importable ({type(exc).__name__}: {exc})",
        )

    if not kernels.TRITON_AVAILABLE:
        return False, None, False, kernels.why_not()
    try:
        reason = kernels.why_not()
    except Exception as exc:  # a broken CUDA driver can raise from torch.cuda.is_available()
        reason = f"CUDA probe failed ({type(exc).__name__}: {exc})"
    return True, kernels.TRITON_VERSION, reason is None, reason


def env() -> dict[str, object]:
    """Describe the compute environment.

    Returns:
        dict with keys ``csrc`` (bool: ``fastntk._C`` loaded), ``csrc_error`` (str or None),
        ``csrc_cuda`` (bool: it was built with its CUDA kernels), ``csrc_cuda_error``,
        ``triton`` (bool: importable), ``triton_version``, ``triton_runnable`` (bool: a GPU,
        or ``TRITON_INTERPRET=1`` for CPU tensors), ``triton_error`` (str or None), ``cuda``
        (bool), ``device_name`` (GPU name or None), ``torch_version``, ``num_threads``,
        ``allocator_tuned`` (bool: :func:`tune_allocator` took effect in this process).
    """
    from . import _ext

    try:
        csrc = _ext.available()
        csrc_error = _ext.why_not()
        csrc_cuda_error = _ext.cuda_why_not()
    except Exception as exc:  # never let a probe break the caller
        csrc, csrc_error = False, f"{type(exc).__name__}: {exc}"
        csrc_cuda_error = csrc_error
    triton_ok, triton_version, triton_runnable, triton_error = _triton_probe()
    try:
        cuda = bool(torch.cuda.is_available())
        device_name = torch.cuda.get_device_name(0) if cuda else None
    except Exception:
        cuda, device_name = False, None
    return {
        "csrc": csrc,
        "csrc_error": csrc_error,
        "csrc_cuda": csrc_cuda_error is None,
        "csrc_cuda_error": csrc_cuda_error,
        "triton": triton_ok,
        "triton_version": triton_version,
        "triton_runnable": triton_runnable,
        "triton_error": triton_error,
        "cuda": cuda,
        "device_name": device_name,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "allocator_tuned": _TUNED is not None,
    }


# the settings of the last tune_allocator() call that took effect, for reports
_TUNED: dict[str, object] | None = None

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(
    mmap_threshold: int = 2**30, trim_threshold: int = 2**31 - 1
) -> dict[str, object]:
    """Make glibc's allocator keep freed memory for reuse, process-wide (opt-in).

    By default glibc hands freed blocks of several MB back to the system (``munmap``,
    heap trimming) and page-faults them in again on the next allocation; PyTorch on the CPU
    allocates such blocks for every layer of every backward pass. This sets
    ``M_MMAP_THRESHOLD`` (blocks below it come from the heap, which is reused) and
    ``M_TRIM_THRESHOLD`` (free memory the heap keeps); both together, since setting only
    the trim threshold turns off glibc's adaptive mmap threshold and makes it worse.

    Whether it pays depends on the workload (2-core AMD EPYC, NB201, medians of
    ``python bench/bench_engine.py ... [--tune-allocator]``; bench/results/engine_cpu.csv,
    tuned rows of commit 7787cdf against untuned ones of 957ff31): "trace" at N=256
    14.3 -> 12.6 s and torch.func vmap(jacrev) 1.2-1.9x faster, but fastntk's "sum"
    kernels slower (N=64 0.37 -> 0.46 s, N=128 0.76 -> 0.86 s), which keep their big
    temporaries in reused memory already.

    The process keeps its peak heap instead of returning memory to the system, for the
    rest of its life. fastntk never calls this by itself; the ``fastntk`` command line
    does for its own process when ``FASTNTK_TUNE_ALLOCATOR=1``.

    Returns:
        ``{"applied": bool, "reason": str | None, "mmap_threshold": int,
        "trim_threshold": int}``; ``applied`` is False off glibc (macOS, musl, Windows)
        or when glibc refuses a value.
    """
    out: dict[str, object] = {
        "applied": False,
        "reason": None,
        "mmap_threshold": mmap_threshold,
        "trim_threshold": trim_threshold,
    }
    lib, _ = platform.libc_ver()
    if lib != "glibc":
        out["reason"] = f"not glibc (libc: {lib or 'unknown'}); nothing changed"
        return out
    try:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError) as exc:
        out["reason"] = f"mallopt unavailable ({exc})"
        return out
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok_trim = ok_mmap and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    out["applied"] = ok_mmap and ok_trim
    global _TUNED
    _TUNED = out if out["applied"] else _TUNED
    if not out["applied"]:
        out["reason"] = (
            f"glibc refused M_MMAP_THRESHOLD={mmap_threshold}"
            if not ok_mmap
            else f"glibc refused M_TRIM_THRESHOLD={trim_threshold}"
        )
    return out


__all__ = ["env", "tune_allocator"]
