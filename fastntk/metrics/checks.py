"""Input checks shared by the metrics: kernels, labels, batches and the spectral options.

Each check raises the package's typed errors (:mod:`fastntk.errors`): a wrong type or dtype
:class:`InputTypeError`, an unusable value :class:`InputError`, NaN or Inf entries
:class:`NonFiniteKernelError`, a bad option :class:`OptionError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fastntk import _args, _model
from fastntk.errors import InputError, InputTypeError, NonFiniteKernelError, OptionError

#: What a numerically singular kernel gives (:func:`fastntk.metrics.condition_number`).
SINGULAR_MODES = ("inf", "nonzero", "raise")


def as_tensor(K: Any, what: str = "kernel") -> torch.Tensor:
    """``K`` (a tensor or array-like) as a detached real tensor, dtype and device kept."""
    if isinstance(K, torch.Tensor):
        t = K.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(K))
        except (TypeError, ValueError) as e:
            raise InputTypeError(f"{what} must be a tensor or array-like, got {type(K)}") from e
    if t.dtype == torch.bool or t.is_complex():
        raise InputTypeError(f"{what} must be real-valued, got dtype {t.dtype}")
    return t


def eps_of(t: torch.Tensor) -> float:
    """Machine epsilon of ``t``'s dtype (float64's for integer tensors)."""
    if t.is_floating_point():
        return float(torch.finfo(t.dtype).eps)
    return float(torch.finfo(torch.float64).eps)


def check_finite(t: torch.Tensor, what: str) -> None:
    """:class:`NonFiniteKernelError` naming the counts if ``t`` has NaN or Inf entries."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteKernelError(f"{what} contains {n_nan} NaN and {n_inf} Inf entries")


def check_kernel(K: Any, what: str = "kernel", *, square: bool = True) -> torch.Tensor:
    """A kernel as a float64 CPU tensor: 2-D, non-empty, finite, (N, N) if ``square``."""
    t = as_tensor(K, what)
    if t.dim() != 2:
        raise InputError(f"{what} must be 2-D (N, N), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise InputError(f"{what} is empty (shape {tuple(t.shape)})")
    if square and t.shape[0] != t.shape[1]:
        raise InputError(f"{what} must be square (N, N), got shape {tuple(t.shape)}")
    check_finite(t, what)
    return t.to(device="cpu", dtype=torch.float64)


def check_labels(y: Any, n: int, what: str = "labels") -> torch.Tensor:
    """(N,) integer class labels (integral floats accepted) as an int64 CPU tensor."""
    t = as_tensor(y, what)
    if t.dim() != 1:
        raise InputError(f"{what} must be 1-D (N,), got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if not bool(torch.all(t == torch.round(t))):
            raise InputTypeError(f"{what} must be integer class labels, got dtype {t.dtype}")
        t = t.to(torch.int64)
    if t.numel() != n:
        raise InputError(f"{what} has {t.numel()} entries, but the kernel has N = {n}")
    return t.to(device="cpu", dtype=torch.int64)


def check_batch(x: Any, what: str) -> torch.Tensor:
    """A model's input batch: a non-empty float tensor, or integer token ids."""
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{what} must be a torch.Tensor, got {type(x)}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise InputError(f"{what} is an empty batch (shape {tuple(x.shape)})")
    if not (x.is_floating_point() or _model.is_index(x)):
        raise InputTypeError(f"{what} must be floating point (or integer token ids for "
                             f"models with nn.Embedding), got {x.dtype}")  # fmt: skip
    return x


def check_rtol(rtol: Any) -> None:
    """The spectral tolerance: None (the dtype's default) or a finite number >= 0."""
    if rtol is not None:
        _args.real(rtol, "rtol")


def check_singular(singular: Any) -> None:
    """One of :data:`SINGULAR_MODES`."""
    if singular not in SINGULAR_MODES:
        raise OptionError(f"singular must be one of {SINGULAR_MODES}, got {singular!r}")
