"""Kernel-level metrics: functions of a kernel ``K`` (a ``(N, N)`` tensor, any float dtype)
that return a Python ``float``: :func:`fnorm`, :func:`mean`, :func:`condition_number`,
:func:`ncn`, :func:`lga`, :func:`trainability`, :func:`kernel_correlation`,
:func:`relative_kernel_difference`; plus :func:`spectrum` (float64 eigenvalues) and
:func:`label_matrix`.

Numerical conventions (shared by every spectral metric):

* Eigenvalues are computed in float64 with ``torch.linalg.eigvalsh`` on the
  symmetrised kernel ``(K + Kᵀ) / 2``. A kernel whose relative asymmetry
  ``‖K − Kᵀ‖_F / ‖K‖_F`` exceeds ``1e-4`` is rejected (it is not a kernel).
* **Clamping rule.** With ``tol = rtol · λmax`` (default ``rtol = N · eps(K.dtype)``,
  the NumPy ``matrix_rank`` rule, with the machine epsilon of the dtype the kernel
  was *computed* in: float32 kernels carry float32 rounding; the model-level
  functions take it from the engine's computation dtype), eigenvalues with
  ``|λ| <= tol`` are numerically zero. An eigenvalue below ``-tol`` means the
  kernel is indefinite beyond rounding: :class:`InputError`. ``λmax <= 0``
  (a zero or negative kernel), or ``rtol >= 1`` (no eigenvalue can be told from
  zero: a bfloat16 kernel at N >= 128, float16 at N >= 1024): :class:`InputError`.
* **Singular kernels** (``λmin`` numerically zero) have an infinite condition
  number: :func:`condition_number` returns ``math.inf`` (``ncn``: ``-math.inf``),
  the only place a metric returns an infinity. ``singular="nonzero"`` gives the
  LGA reference code's rule (``λmax`` over the smallest *nonzero* eigenvalue) and
  ``singular="raise"`` raises :class:`InputError`.
* A kernel containing NaN or Inf raises :class:`NonFiniteKernelError`; an empty,
  non-square or non-2-D kernel raises :class:`InputError`. No metric returns NaN
  (``compute_metrics(..., errors="nan")`` records a metric that raised as NaN).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fastntk.errors import InputError
from fastntk.metrics.checks import (
    as_tensor,
    check_kernel,
    check_labels,
    check_rtol,
    check_singular,
    eps_of,
)

__all__ = [
    "condition_number",
    "fnorm",
    "frobenius",
    "kernel_correlation",
    "label_matrix",
    "lga",
    "mean",
    "ncn",
    "relative_kernel_difference",
    "spectrum",
    "trainability",
]

# Relative asymmetry above which a square matrix is not accepted as a kernel.
_SYM_RTOL = 1e-4


def _scaled(t: torch.Tensor) -> torch.Tensor:
    """``t / max|t|`` (``t`` if zero): sums of squares of entries near 1e160 overflow,
    near 1e-170 underflow, in float64."""
    top = float(t.abs().max()) if t.numel() else 0.0
    return t / top if top > 0.0 else t


def frobenius(t: torch.Tensor) -> float:
    """``‖t‖_F`` of a float64 tensor, scaled by ``max|t|`` against overflow and underflow."""
    top = float(t.abs().max()) if t.numel() else 0.0
    return top * float(torch.linalg.matrix_norm(t / top)) if top > 0.0 else 0.0


def _pearson(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    a, b = _scaled(a.reshape(-1)), _scaled(b.reshape(-1))
    a = a - a.mean()
    b = b - b.mean()
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    if float(na) == 0.0 or float(nb) == 0.0:
        raise InputError(f"{what} is undefined: one argument is constant (zero variance)")
    return float(torch.clamp((a @ b) / (na * nb), -1.0, 1.0))


def spectrum(K: Any) -> torch.Tensor:
    """Eigenvalues of a symmetric kernel, float64, ascending.

    Args:
        K: (N, N) kernel.

    Returns:
        (N,) float64 CPU tensor from ``torch.linalg.eigvalsh((K + Kᵀ)/2)``. No clamping
        here; the spectral metrics apply the module's clamping rule.
    """
    Kd = check_kernel(K)
    nrm = float(torch.linalg.matrix_norm(Kd))
    asym = float(torch.linalg.matrix_norm(Kd - Kd.T))
    if nrm > 0 and asym > _SYM_RTOL * nrm:
        raise InputError(
            f"kernel is not symmetric (relative asymmetry {asym / nrm:.3g} > {_SYM_RTOL}); "
            "spectral metrics need Θ(X, X)"
        )
    return torch.linalg.eigvalsh((Kd + Kd.T) / 2)


def _clamped_spectrum(K: Any, rtol: float | None) -> tuple[torch.Tensor, float]:
    """Eigenvalues (ascending, float64) with numerically-zero ones set to 0, and ``tol``."""
    t = as_tensor(K)
    lam = spectrum(t)
    n = lam.numel()
    lmax = float(lam[-1])
    if not lmax > 0.0:
        raise InputError(f"kernel has no positive eigenvalue (λmax = {lmax:.3g}); not a NTK")
    default = rtol is None
    if default:
        rtol = n * eps_of(t)
    check_rtol(rtol)
    if rtol >= 1.0:
        why = (f"the default rtol = N·eps({t.dtype}) = {rtol:.3g}" if default
               else f"rtol = {rtol:.3g}")  # fmt: skip
        raise InputError(
            f"no eigenvalue of this {n} x {n} kernel can be told from zero: {why} >= 1; "
            "compute the kernel in float32 or float64 (dtype=...), or pass rtol < 1"
        )
    tol = rtol * lmax
    lmin = float(lam[0])
    if lmin < -tol:
        raise InputError(
            f"kernel is indefinite beyond rounding: λmin = {lmin:.3g} < -rtol·λmax = {-tol:.3g} "
            f"(rtol = {rtol:.3g}); compute it in float64 (dtype=torch.float64) "
            "or pass a larger rtol"
        )
    lam = torch.where(lam.abs() <= tol, torch.zeros_like(lam), lam)
    return lam, tol


def fnorm(K: Any) -> float:
    """Frobenius norm ``‖Θ‖_F`` (LGA paper, Metric I; higher is better)."""
    return frobenius(check_kernel(K))


def mean(K: Any) -> float:
    """Mean of all N² entries of Θ (LGA paper Eq. 5, KNAS-style "Mean"; higher is better)."""
    return float(check_kernel(K).mean())


def condition_number(K: Any, *, rtol: float | None = None, singular: str = "inf") -> float:
    """Condition number ``λmax / λmin`` of a PSD kernel (TE-NAS; lower is better).

    Args:
        K: (N, N) symmetric PSD kernel.
        rtol: eigenvalues with ``|λ| <= rtol · λmax`` are numerically zero
            (default ``N · eps(K.dtype)``).
        singular: what a numerically singular kernel gives: ``"inf"`` (default,
            ``math.inf``), ``"nonzero"`` (the LGA reference code: λmax over the
            smallest eigenvalue above the tolerance) or ``"raise"`` (:class:`InputError`).

    Returns:
        The condition number, ``>= 1``, or ``math.inf`` under the rule above.
    """
    check_singular(singular)
    lam, tol = _clamped_spectrum(K, rtol)
    lmax = float(lam[-1])
    lmin = float(lam[0])
    if lmin > 0.0:
        return lmax / lmin
    if singular == "inf":
        return math.inf
    if singular == "raise":
        raise InputError(
            f"kernel is numerically singular: {int((lam == 0).sum())} of {lam.numel()} "
            f"eigenvalues are within rtol·λmax = {tol:.3g} of zero"
        )
    nonzero = lam[lam > 0]
    return lmax / float(nonzero[0])


def ncn(K: Any, *, rtol: float | None = None, singular: str = "inf") -> float:
    """Negative condition number ``-λmax/λmin`` (LGA paper's NCN; higher is better)."""
    return -condition_number(K, rtol=rtol, singular=singular)


def label_matrix(y: Any) -> torch.Tensor:
    """The LGA label matrix ``L_ij = +1`` if ``y_i == y_j`` else ``-1`` (float64, (N, N))."""
    t = as_tensor(y, "labels")
    yt = check_labels(t, t.shape[0] if t.dim() == 1 else -1)
    same = yt[:, None] == yt[None, :]
    return same.to(torch.float64) * 2.0 - 1.0


def lga(K: Any, y: Any) -> float:
    """Label-Gradient Alignment, Eq. 12 of the LGA paper (higher is better).

    ``LGA = <Θ − μ(Θ), L − μ(L)> / (‖Θ − μ(Θ)‖₂ ‖L − μ(L)‖₂)`` where the inner product
    and the 2-norms are taken over the N² entries (so it is the Pearson correlation
    between the entries of Θ and of L), ``μ`` is the mean over all N² entries
    (diagonal included) and ``L_ij = +1`` for same-class pairs, ``-1`` otherwise.

    Args:
        K: (N, N) kernel.
        y: (N,) integer class labels.

    Raises:
        InputError: wrong label length, a single class (L constant) or a constant kernel.
    """
    Kd = check_kernel(K)
    yt = check_labels(y, Kd.shape[0])
    if int(torch.unique(yt).numel()) < 2:
        raise InputError("LGA needs at least two classes in the labels (L is constant)")
    L = (yt[:, None] == yt[None, :]).to(torch.float64) * 2.0 - 1.0
    return _pearson(Kd, L, "LGA (constant kernel)")


def trainability(K: Any, *, rtol: float | None = None) -> float:
    """NTK-score trainability ``S_t`` (Eq. 5 of the NTK-score paper).

    ``S_t = Σ_{i<k} λ_i / Σ_i λ_i`` with eigenvalues in descending order and
    ``k = ⌈√n⌉``: the share of the spectrum's total mass (the trace) held by the
    ``⌈√n⌉`` largest eigenvalues, in ``[k/n, 1]``. Eigenvalues are clamped with the
    module's rule (numerical zeros set to 0, indefinite kernels rejected).
    The paper argues better networks have "more similar" eigenvalues, i.e. a smaller
    ``S_t``: ``DIRECTIONS["trainability"]`` is False, the paper's direction. On 200
    NAS-Bench-201 architectures with eval BatchNorm (batch 64,
    bench/results/nb201_metric_correlation.md) S_t's Kendall tau with accuracy is
    +0.110, i.e. the data lean the other way in that setting; with per-sample BatchNorm
    the paper's direction holds (oriented tau +0.492, bench/results/nb201_space.md).
    """
    lam, _ = _clamped_spectrum(K, rtol)
    n = lam.numel()
    k = math.ceil(math.sqrt(n))
    desc = torch.flip(lam, dims=(0,))
    return float(desc[:k].sum() / desc.sum())


def kernel_correlation(K0: Any, Kt: Any) -> float:
    """Kernel correlation of the LGA paper §4.1: Pearson ``Cov(Θ0, Θt) / (σ(Θ0) σ(Θt))``.

    Computed over all entries; ``K0`` and ``Kt`` must have the same 2-D shape (a cross
    kernel Θ(X1, X2) is allowed). Raises :class:`InputError` if either is constant.
    """
    A = check_kernel(K0, "K0", square=False)
    B = check_kernel(Kt, "Kt", square=False)
    if A.shape != B.shape:
        raise InputError(f"kernel shapes differ: {tuple(A.shape)} vs {tuple(B.shape)}")
    return _pearson(A, B, "kernel correlation")


def relative_kernel_difference(K0: Any, Kt: Any) -> float:
    """Relative kernel difference of the LGA paper §4.1: ``‖Θt − Θ0‖_F / ‖Θ0‖_F``."""
    A = check_kernel(K0, "K0", square=False)
    B = check_kernel(Kt, "Kt", square=False)
    if A.shape != B.shape:
        raise InputError(f"kernel shapes differ: {tuple(A.shape)} vs {tuple(B.shape)}")
    top = max(float(A.abs().max()), float(B.abs().max()))
    n0 = frobenius(A)
    if n0 == 0.0:
        raise InputError("relative kernel difference is undefined: ‖Θ0‖_F = 0")
    return frobenius(B / top - A / top) * top / n0
