"""Lazy, failure-proof access to the optional C++ extension ``fastntk._C``.

``fastntk._C`` registers CPU ops as ``torch.ops.fastntk.{gram_sym, gram_cross,
conv2d_psg, affine_psg}``; a CUDA build (setup.py) adds CUDA kernels for the first three
(:func:`cuda_available`). Importing this module never imports the extension; the first call to
:func:`available` (or to a wrapper) tries once and remembers the outcome. Nothing here
raises on a missing or broken build: :func:`why_not` says what went wrong, and the
wrappers raise :class:`fastntk.errors.UnsupportedError` only when called without it.
"""

from __future__ import annotations

import importlib
import os
import threading

import torch

from .errors import UnsupportedError

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None}


def _load() -> bool:
    if _state["tried"]:
        return bool(_state["ok"])
    with _lock:
        if _state["tried"]:
            return bool(_state["ok"])
        if os.environ.get("FASTNTK_NO_EXT") == "1":
            _state["error"] = "disabled by FASTNTK_NO_EXT=1"
        else:
            try:
                importlib.import_module("fastntk._C")
                torch.ops.fastntk.gram_sym  # noqa: B018 - the registration must be there
                _state["ok"] = True
            except Exception as exc:  # ImportError, an ABI mismatch (OSError), ...
                msg = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, ModuleNotFoundError):
                    msg += (
                        " (not built: run `pip install --no-build-isolation -e .` with a "
                        "C++ compiler; FASTNTK_NO_EXT=1 skips it)"
                    )
                _state["error"] = msg
        _state["tried"] = True
    return bool(_state["ok"])


def available() -> bool:
    """True when ``fastntk._C`` is importable and its ops are registered."""
    return _load()


def why_not() -> str | None:
    """Why the extension cannot be used, or ``None`` when it can."""
    _load()
    return None if _state["ok"] else str(_state["error"])


def cuda_available() -> bool:
    """True when the extension was built with its CUDA kernels (gram_sym, gram_cross, conv2d_psg)."""
    return cuda_why_not() is None


def cuda_why_not() -> str | None:
    """Why the extension's CUDA kernels cannot be used, or ``None`` when they can."""
    if not _load():
        return str(_state["error"])
    import fastntk._C as ext

    if not getattr(ext, "with_cuda", 0):
        return (
            f"fastntk._C was built without CUDA (torch {torch.__version__}"
            + (" is a CPU build" if torch.version.cuda is None else ", or nvcc was not found")
            + "); a CUDA torch and nvcc at build time add them"
        )
    return None


def _require(*tensors: torch.Tensor) -> None:
    if not _load():
        raise UnsupportedError(f"the fastntk C++ extension is unavailable: {_state['error']}")
    if any(t.device.type == "cuda" for t in tensors):
        reason = cuda_why_not()
        if reason is not None:
            raise UnsupportedError(f"the fastntk C++ extension has no CUDA kernels: {reason}")


def gram_sym(a: torch.Tensor, out: torch.Tensor, fp64_acc: bool = False) -> torch.Tensor:
    """``out += a aᵀ`` (upper-triangle tiles, mirrored), in place, on the CPU or on a GPU
    with a CUDA build.

    Args:
        a: (N, P) float32 or float64 (made row-contiguous here if it is not).
        out: (N, N) float32 or float64 with contiguous rows; float64 input needs float64 out.
        fp64_acc: accumulate float32 products in float64 (free when ``out`` is float64).

    Returns:
        ``out``.
    """
    _require(a)
    if a.dim() == 2 and a.size(1) > 1 and a.stride(1) != 1:
        a = a.contiguous()
    torch.ops.fastntk.gram_sym(a, out, fp64_acc)
    return out


def gram_cross(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, fp64_acc: bool = False
) -> torch.Tensor:
    """``out += a bᵀ`` in place (CPU, or GPU with a CUDA build). a: (N1, P), b: (N2, P),
    out: (N1, N2)."""
    _require(a, b)
    if a.dim() == 2 and a.size(1) > 1 and a.stride(1) != 1:
        a = a.contiguous()
    if b.dim() == 2 and b.size(1) > 1 and b.stride(1) != 1:
        b = b.contiguous()
    torch.ops.fastntk.gram_cross(a, b, out, fp64_acc)
    return out


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if len(v) != 2:  # (a 3-D kernel size was read as its first two values)
        raise ValueError(f"conv2d_psg takes an int or a pair, got {v!r}")
    return int(v[0]), int(v[1])


def conv2d_psg(
    x: torch.Tensor,
    gout: torch.Tensor,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Per-sample Conv2d weight gradients without an unfold buffer (CPU, or GPU with a CUDA
    build).

    Args:
        x: (N, C_in, H, W) float32/float64 layer input (unpadded).
        gout: (N, C_out, oH, oW) output gradient, same dtype.
        kernel_size, stride, padding, dilation, groups: as in ``nn.Conv2d`` (zero padding).

    Returns:
        (N, C_out, C_in // groups, kh, kw), dtype of ``x``. A NaN or Inf in ``x`` can reach
        more weights than it does in PyTorch (stride 1 reads padded rows with zero weight,
        0 * Inf); the engine refuses non-finite kernels.
    """
    _require(x, gout)
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    return torch.ops.fastntk.conv2d_psg(
        x.contiguous(), gout.contiguous(), kh, kw, sh, sw, ph, pw, dh, dw, int(groups)
    )


def affine_psg(
    x: torch.Tensor, g: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a channel-affine layer in one pass over its input.

    Args:
        x: (N, C, ...) float32/float64 layer input.
        g: output gradient, same shape and dtype.
        mean: (C,) or (N, C) values subtracted from ``x`` (running or per-sample means).

    Returns:
        ``(Σ g·(x − mean), Σ g)`` over each (sample, channel) plane, each (N, C).
    """
    _require()
    if x.device.type != "cpu":
        raise UnsupportedError(
            f"fastntk's affine_psg op is CPU-only, got {x.device} tensors (PyTorch's "
            "reductions serve it on the GPU)"
        )
    sgx, sg = torch.ops.fastntk.affine_psg(x.contiguous(), g.contiguous(), mean.contiguous())
    return sgx, sg


__all__ = [
    "affine_psg",
    "available",
    "conv2d_psg",
    "cuda_available",
    "cuda_why_not",
    "gram_cross",
    "gram_sym",
    "why_not",
]
