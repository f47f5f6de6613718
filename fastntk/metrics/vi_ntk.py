"""fastntk's ViNTK: the NTK of a network on its input and on the input's high-frequency
(Fourier) component, and a label-free kernel metric of it. fastntk's reading of the ViNTK
abstract (the paper's exact formula is not available to us), not the paper's code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from fastntk import _args
from fastntk.errors import InputError, OptionError
from fastntk.metrics.checks import (
    as_tensor,
    check_batch,
    check_kernel,
    check_rtol,
    check_singular,
    eps_of,
)
from fastntk.metrics.kernel import fnorm, mean, ncn, trainability
from fastntk.metrics.model_kernels import kernel_of, ntk_kwargs

__all__ = ["highpass", "vintk", "vintk_kernel"]


def highpass(x: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """FFT high-pass of a batch over its spatial dims (every dim after (N, C)).

    Frequencies with normalised radius ``sqrt(Σ_d f_d²) < cutoff`` are removed, with
    ``f_d`` in cycles per sample from ``torch.fft.fftfreq`` (so ``|f_d| <= 0.5``; the
    largest radius is ``0.5·√D`` for D spatial dims). ``cutoff = 0`` keeps everything
    (identity); the DC component is removed for any ``cutoff > 0``.

    Args:
        x: (N, C, *spatial) float tensor, at least one spatial dim.
        cutoff: radius threshold in cycles/sample, ``>= 0``.

    Returns:
        Real tensor of x's shape and dtype.
    """
    x = check_batch(x, "x")
    if not x.is_floating_point():
        raise InputError(
            f"highpass filters images; {x.dtype} token ids have no spatial frequencies (the "
            "filtered ids would be other, even negative, ids): leave vintk out for token models"
        )
    if x.dim() < 3:
        raise InputError(f"highpass needs (N, C, *spatial) inputs, got shape {tuple(x.shape)}")
    cutoff = _args.real(cutoff, "cutoff")
    dims = tuple(range(2, x.dim()))
    X = torch.fft.fftn(x.to(torch.float64), dim=dims)
    r2 = torch.zeros((), dtype=torch.float64)
    for i, d in enumerate(dims):
        f = torch.fft.fftfreq(x.shape[d], dtype=torch.float64)
        shape = [1] * len(dims)
        shape[i] = -1
        r2 = r2 + f.reshape(shape) ** 2
    keep = (r2.sqrt() >= cutoff).to(X.dtype)
    return torch.fft.ifftn(X * keep, dim=dims).real.to(x.dtype).to(x.device)


def vintk_kernel(
    model: nn.Module,
    x: torch.Tensor,
    *,
    cutoff: float = 0.25,
    beta: float = 1.0,
    bn: str = "eval",
    params: Any = None,
    output: Any = "sum",
    dtype: Any = None,
    chunk_size: int | None = None,
    kernel: torch.Tensor | None = None,
) -> torch.Tensor:
    """fastntk's ViNTK kernel: ``Θ_vi = Θ(x, x) + β · Θ(hp(x), hp(x))`` (float64, (N, N)).

    ``hp`` is :func:`highpass` with ``cutoff``. ``Θ_vi`` is the NTK of the feature map
    ``x ↦ [∇θ f(x), √β ∇θ f(hp(x))]``: the network's tangent features on the image and on
    its high-frequency (Fourier) component, so architectures whose gradients respond to
    high-frequency content get a larger, better-conditioned kernel. This is fastntk's
    reading of the ViNTK abstract ("generalises the NTK to the high-frequency domain by
    integrating the Fourier features from inputs"); the paper's exact formula is not
    available to us. With ``bn="batch"`` hp(x) is its own BatchNorm batch.

    ``kernel``: Θ(x, x) if already computed with the same options (reused, saving one
    engine call); otherwise it is computed.
    """
    return _vintk_parts(model, x, cutoff, beta, bn, params, output, dtype, chunk_size, kernel)[0]


def _vintk_parts(
    model, x, cutoff, beta, bn, params, output, dtype, chunk_size, kernel, progress=None
) -> tuple[torch.Tensor, float]:
    """Θ_vi in float64, and the machine epsilon of the dtype its kernels were computed in
    (the spectral reducers' rounding tolerance; float64 here would hide float32 noise)."""
    x = check_batch(x, "x")
    beta = _args.real(beta, "beta")
    kw = {**ntk_kwargs(bn, params, output, dtype, chunk_size), "progress": progress}
    xh = highpass(x, cutoff)
    if kernel is None:
        K = kernel_of(model, x, kw)
    else:
        K = as_tensor(kernel, "kernel").cpu()  # (the high-pass kernel is a CPU one)
        check_kernel(K, "kernel")
        if K.shape[0] != x.shape[0]:
            raise InputError(f"kernel is {tuple(K.shape)} but x has N = {x.shape[0]}")
    eps = eps_of(K)
    if beta == 0:
        return K.double(), eps
    Kh = kernel_of(model, xh, kw)
    return K.double() + beta * Kh.double(), max(eps, eps_of(Kh))


def vintk(
    model: nn.Module,
    x: torch.Tensor,
    *,
    cutoff: float = 0.25,
    beta: float = 1.0,
    reduce: str = "ncn",
    rtol: float | None = None,
    singular: str = "inf",
    bn: str = "eval",
    params: Any = None,
    output: Any = "sum",
    dtype: Any = None,
    chunk_size: int | None = None,
    kernel: torch.Tensor | None = None,
    progress: bool | None = None,
) -> float:
    """fastntk's ViNTK score: a label-free kernel metric of :func:`vintk_kernel`.

    Default ``reduce="ncn"``: the negative condition number of ``Θ_vi`` (the TE-NAS
    trainability measure, which the ViNTK paper reports as failing on ViTs with the
    plain NTK), higher is better; ``reduce`` may also be ``"fnorm"``, ``"mean"`` or
    ``"trainability"``. fastntk's reading of the ViNTK abstract, not the paper's code.
    ``rtol`` and ``singular`` as :func:`condition_number`; the default tolerance uses the
    epsilon of the dtype the kernels were computed in.
    """
    names = ("fnorm", "mean", "ncn", "trainability")
    if reduce not in names:
        raise OptionError(f"reduce must be one of {sorted(names)}, got {reduce!r}")
    check_singular(singular)
    check_rtol(rtol)
    K, eps = _vintk_parts(model, x, cutoff, beta, bn, params, output, dtype, chunk_size, kernel,
                          progress)  # fmt: skip
    r = rtol if rtol is not None else K.shape[0] * eps
    reducers: dict[str, Callable[[torch.Tensor], float]] = {
        "ncn": lambda K: ncn(K, rtol=r, singular=singular),
        "fnorm": fnorm,
        "mean": mean,
        "trainability": lambda K: trainability(K, rtol=r),
    }
    return reducers[reduce](K)
