"""Training-free metrics computed from empirical NTKs.

Two layers:

* **Kernel-level** functions take a kernel ``K`` (a ``(N, N)`` tensor, any float
  dtype) and return a Python ``float``: :func:`fnorm`, :func:`mean`,
  :func:`condition_number`, :func:`ncn`, :func:`lga`, :func:`trainability`,
  :func:`kernel_correlation`, :func:`relative_kernel_difference`; plus
  :func:`spectrum` (float64 eigenvalues) and :func:`borda` (rank aggregation);
  :func:`sketch_metrics` takes a sketch S (N, m) of :func:`fastntk.ntk_sketch` instead
  of a kernel, for N too large for Θ.
* **Model-level** functions take a model and data, compute the kernels they need
  with :func:`fastntk.ntk` and never change the model: :func:`compute_metrics`,
  :func:`ntk_score`, :func:`vintk`, :func:`kernel_evolution`.

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

import copy
import math
import threading
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastntk import _args, _model
from fastntk.errors import (
    InputError,
    InputTypeError,
    NonFiniteKernelError,
    OptionError,
)

__all__ = [
    "DIRECTIONS",
    "EXPRESSIVITY_HIGHER_IS_BETTER",
    "BN_MODES",
    "METRICS",
    "NAS",
    "NAS_METRICS",
    "KernelEvolution",
    "MetricSpec",
    "borda",
    "compute_metrics",
    "condition_number",
    "expand_metrics",
    "fnorm",
    "highpass",
    "kernel_correlation",
    "kernel_evolution",
    "lga",
    "label_matrix",
    "mean",
    "ncn",
    "ntk_score",
    "relative_kernel_difference",
    "sketch_metrics",
    "spectrum",
    "trainability",
    "vintk",
    "vintk_kernel",
]

# Relative asymmetry above which a square matrix is not accepted as a kernel.
_SYM_RTOL = 1e-4

# --------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------


def _as_tensor(K: Any, what: str = "kernel") -> torch.Tensor:
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


def _eps_of(t: torch.Tensor) -> float:
    if t.is_floating_point():
        return float(torch.finfo(t.dtype).eps)
    return float(torch.finfo(torch.float64).eps)


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteKernelError(f"{what} contains {n_nan} NaN and {n_inf} Inf entries")


def _check_kernel(K: Any, what: str = "kernel", *, square: bool = True) -> torch.Tensor:
    """Validate a kernel and return it as a float64 CPU tensor."""
    t = _as_tensor(K, what)
    if t.dim() != 2:
        raise InputError(f"{what} must be 2-D (N, N), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise InputError(f"{what} is empty (shape {tuple(t.shape)})")
    if square and t.shape[0] != t.shape[1]:
        raise InputError(f"{what} must be square (N, N), got shape {tuple(t.shape)}")
    _check_finite(t, what)
    return t.to(device="cpu", dtype=torch.float64)


def _check_labels(y: Any, n: int, what: str = "labels") -> torch.Tensor:
    t = _as_tensor(y, what)
    if t.dim() != 1:
        raise InputError(f"{what} must be 1-D (N,), got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if not bool(torch.all(t == torch.round(t))):
            raise InputTypeError(f"{what} must be integer class labels, got dtype {t.dtype}")
        t = t.to(torch.int64)
    if t.numel() != n:
        raise InputError(f"{what} has {t.numel()} entries, but the kernel has N = {n}")
    return t.to(device="cpu", dtype=torch.int64)


def _scaled(t: torch.Tensor) -> torch.Tensor:
    """``t / max|t|`` (``t`` if zero): sums of squares of entries near 1e160 overflow,
    near 1e-170 underflow, in float64."""
    top = float(t.abs().max()) if t.numel() else 0.0
    return t / top if top > 0.0 else t


def _frobenius(t: torch.Tensor) -> float:
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


# --------------------------------------------------------------------------------------
# kernel-level metrics
# --------------------------------------------------------------------------------------


def spectrum(K: Any) -> torch.Tensor:
    """Eigenvalues of a symmetric kernel, float64, ascending.

    Args:
        K: (N, N) kernel.

    Returns:
        (N,) float64 CPU tensor from ``torch.linalg.eigvalsh((K + Kᵀ)/2)``. No clamping
        here; the spectral metrics apply the module's clamping rule.
    """
    Kd = _check_kernel(K)
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
    t = _as_tensor(K)
    lam = spectrum(t)
    n = lam.numel()
    lmax = float(lam[-1])
    if not lmax > 0.0:
        raise InputError(f"kernel has no positive eigenvalue (λmax = {lmax:.3g}); not a NTK")
    default = rtol is None
    if default:
        rtol = n * _eps_of(t)
    _check_rtol(rtol)
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


def _check_rtol(rtol: Any) -> None:
    if (
        isinstance(rtol, bool) or not isinstance(rtol, numbers.Real)
        or not rtol >= 0 or math.isinf(rtol)
    ):  # fmt: skip
        raise OptionError(f"rtol must be a finite number >= 0 (or None), got {rtol!r}")


def _nonneg(value: Any, what: str) -> float:
    """A finite number >= 0 (NaN and inf refused), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        value >= 0 and math.isfinite(value)
    ):
        raise OptionError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def fnorm(K: Any) -> float:
    """Frobenius norm ``‖Θ‖_F`` (LGA paper, Metric I; higher is better)."""
    return _frobenius(_check_kernel(K))


def mean(K: Any) -> float:
    """Mean of all N² entries of Θ (LGA paper Eq. 5, KNAS-style "Mean"; higher is better)."""
    return float(_check_kernel(K).mean())


_SINGULAR_MODES = ("inf", "nonzero", "raise")


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
    if singular not in _SINGULAR_MODES:
        raise OptionError(f"singular must be one of {_SINGULAR_MODES}, got {singular!r}")
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
    t = _as_tensor(y, "labels")
    yt = _check_labels(t, t.shape[0] if t.dim() == 1 else -1)
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
    Kd = _check_kernel(K)
    yt = _check_labels(y, Kd.shape[0])
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
    ``S_t``: ``DIRECTIONS["trainability"]`` is False, the paper's direction. Measured on
    200 NAS-Bench-201 architectures (eval BatchNorm, batch 64; see
    bench/results/nb201_metric_correlation.md, commit 0dc0fb0) S_t's Kendall tau with
    accuracy is +0.110, i.e. the data lean the other way in that setting.
    """
    lam, _ = _clamped_spectrum(K, rtol)
    n = lam.numel()
    k = math.ceil(math.sqrt(n))
    desc = torch.flip(lam, dims=(0,))
    return float(desc[:k].sum() / desc.sum())


def sketch_metrics(S: Any, y: Any = None, *, chunk: int = 8192) -> dict[str, float]:
    """The kernel metrics of Θ̂ = S Sᵀ from a sketch S (N, m) (:func:`fastntk.ntk_sketch`),
    never forming the (N, N) kernel: for N too large for Θ.

    Each value is the metric of the kernel ``S @ S.T`` (:func:`fnorm`, :func:`mean`,
    :func:`lga`, :func:`trainability`, to rounding), from the (m, m) Gram ``Sᵀ S``
    (accumulated in float64 over row chunks of ``chunk``), ``Sᵀ 1`` and ``Sᵀ Y`` (Y the
    one-hot labels): O(N m² + m³) work, O(m² + chunk·m) memory beyond S.

    * ``fnorm`` = ‖Sᵀ S‖_F; ``mean`` = ‖Sᵀ 1‖² / N²;
    * ``lga`` (when ``y`` is given): the Pearson correlation of the entries of Θ̂ with
      L = 2 Y Yᵀ − 1 1ᵀ, from ΣΘ̂ = ‖Sᵀ1‖², Σ Θ̂∘L = 2‖SᵀY‖²_F − ‖Sᵀ1‖², ΣΘ̂² = ‖SᵀS‖²_F;
    * ``trainability`` (S_t): the ⌈√N⌉ largest eigenvalues of Θ̂ over its trace; the
      nonzero eigenvalues of S Sᵀ are those of Sᵀ S (the others are 0).

    The sketch's error carries over: ``mean`` (linear in Θ̂) is unbiased, ``fnorm``
    is biased upwards by the sketch's variance (E‖Θ̂‖²_F = ‖Θ‖²_F + Σ_ij Var Θ̂_ij, of
    relative order (tr Θ)² / (m ‖Θ‖²_F)). Condition numbers (``ncn``, ``cond``) are not
    offered: Θ̂ has rank at most m, and its smallest eigenvalues are the sketch's noise.

    Args:
        S: (N, m) sketch, Θ ≈ S Sᵀ (any real float dtype; computed in float64).
        y: optional (N,) integer class labels, for ``lga``.
        chunk: rows of S converted to float64 at a time.

    Returns:
        ``{"fnorm", "mean", "trainability"}`` and ``"lga"`` when ``y`` is given.
    """
    t = _as_tensor(S, "sketch")
    if t.dim() != 2 or t.numel() == 0:
        raise InputError(f"sketch must be a non-empty 2-D (N, m) tensor, got shape {tuple(t.shape)}")
    _check_finite(t, "sketch")
    chunk = _args.integer(chunk, "chunk", 1)
    n, m = t.shape
    top = float(t.abs().max())
    if not top > 0.0:
        raise InputError("the sketched kernel is zero (S = 0): no metric is defined")

    def rows_of(r0: int) -> torch.Tensor:  # scaled by 1/max|S|: no overflow in float64
        return t[r0 : r0 + chunk].to(device="cpu", dtype=torch.float64) / top

    gram = torch.zeros(m, m, dtype=torch.float64)
    col_sum = torch.zeros(m, dtype=torch.float64)
    for r0 in range(0, n, chunk):
        rows = rows_of(r0)
        gram += rows.T @ rows
        col_sum += rows.sum(0)
    out: dict[str, float] = {}
    out["fnorm"] = _frobenius(gram) * top**2
    total = float(col_sum @ col_sum)  # ΣΘ̂ / top²
    out["mean"] = total / n**2 * top**2
    lam = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp_min(0.0).flip(0)
    trace = float(gram.diagonal().sum())
    k = math.ceil(math.sqrt(n))
    out["trainability"] = min(1.0, float(lam[:k].sum()) / trace)
    if y is not None:
        yt = _check_labels(y, n)
        classes, idx = torch.unique(yt, return_inverse=True)
        if classes.numel() < 2:
            raise InputError("LGA needs at least two classes in the labels (L is constant)")
        sy = torch.zeros(classes.numel(), m, dtype=torch.float64)
        for r0 in range(0, n, chunk):
            sy.index_add_(0, idx[r0 : r0 + chunk], rows_of(r0))
        counts = torch.bincount(idx).to(torch.float64)
        n2 = float(n) ** 2
        sum_l = 2.0 * float((counts**2).sum()) - n2
        sum_kl = 2.0 * float((sy**2).sum()) - total
        sum_k2 = float((gram**2).sum())  # ‖Θ̂‖²_F = ‖SᵀS‖²_F
        cov = sum_kl - total * sum_l / n2
        var_k = sum_k2 - total**2 / n2
        var_l = n2 - sum_l**2 / n2
        if not var_k > 1e-12 * sum_k2:  # (one-pass variance: below this, cancellation)
            raise InputError(
                "LGA of this sketch is undefined or not resolved in float64: the entries of "
                "S Sᵀ vary by less than 1e-6 of their size (a constant kernel, or one "
                "dominated by its mean; metrics.lga(S @ S.T, y) where N allows)"
            )
        out["lga"] = max(-1.0, min(1.0, cov / math.sqrt(var_k * var_l)))
    return out


def kernel_correlation(K0: Any, Kt: Any) -> float:
    """Kernel correlation of the LGA paper §4.1: Pearson ``Cov(Θ0, Θt) / (σ(Θ0) σ(Θt))``.

    Computed over all entries; ``K0`` and ``Kt`` must have the same 2-D shape (a cross
    kernel Θ(X1, X2) is allowed). Raises :class:`InputError` if either is constant.
    """
    A = _check_kernel(K0, "K0", square=False)
    B = _check_kernel(Kt, "Kt", square=False)
    if A.shape != B.shape:
        raise InputError(f"kernel shapes differ: {tuple(A.shape)} vs {tuple(B.shape)}")
    return _pearson(A, B, "kernel correlation")


def relative_kernel_difference(K0: Any, Kt: Any) -> float:
    """Relative kernel difference of the LGA paper §4.1: ``‖Θt − Θ0‖_F / ‖Θ0‖_F``."""
    A = _check_kernel(K0, "K0", square=False)
    B = _check_kernel(Kt, "Kt", square=False)
    if A.shape != B.shape:
        raise InputError(f"kernel shapes differ: {tuple(A.shape)} vs {tuple(B.shape)}")
    top = max(float(A.abs().max()), float(B.abs().max()))
    n0 = _frobenius(A)
    if n0 == 0.0:
        raise InputError("relative kernel difference is undefined: ‖Θ0‖_F = 0")
    return _frobenius(B / top - A / top) * top / n0


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..m (1 = smallest), ties get the average of the ranks they span."""
    order = np.argsort(v, kind="mergesort")
    sv = v[order]
    ranks = np.empty(len(v), dtype=np.float64)
    i = 0
    m = len(v)
    while i < m:
        j = i
        while j + 1 < m and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def borda(scores: Any, higher_is_better: bool | Sequence[bool]) -> np.ndarray:
    """Borda count over metrics (NTK-score paper Eq. 12).

    Each metric (column) ranks the m architectures 1..m with the *best* architecture
    getting rank m; the Borda total of an architecture is the sum of its ranks, so the
    highest total is the best. **Ties** get the average of the ranks they span
    (fractional ranks, as ``scipy.stats.rankdata(method="average")``), so the totals do
    not depend on the input order. **NaN** scores rank below every number (worst),
    tied among themselves; ``±inf`` rank as the extreme values they are.

    Args:
        scores: (m, k) array-like, architectures × metrics (a 1-D input is one metric).
        higher_is_better: one bool for all metrics or k bools (e.g. from ``DIRECTIONS``).

    Returns:
        (m,) float64 numpy array of Borda totals.
    """
    try:
        a = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputTypeError(f"borda needs numeric scores (architectures x metrics): {e}") from None
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(
            f"scores must be a non-empty (architectures, metrics) table, got shape {a.shape}"
        )
    k = a.shape[1]
    if isinstance(higher_is_better, (bool, np.bool_)):
        dirs = [bool(higher_is_better)] * k
    else:
        dirs = [bool(d) for d in higher_is_better]
        if len(dirs) != k:
            raise InputError(f"higher_is_better has {len(dirs)} entries for {k} metrics")
    total = np.zeros(a.shape[0], dtype=np.float64)
    for c in range(k):
        col = a[:, c] if dirs[c] else -a[:, c]
        col = np.where(np.isnan(col), -np.inf, col)
        # NaN strictly below -inf: rank finite/inf values first, then put NaNs at the bottom.
        nan = np.isnan(a[:, c])
        r = np.empty(len(col))
        if nan.any():
            n_nan = int(nan.sum())
            r[nan] = (n_nan + 1) / 2.0
            r[~nan] = _average_ranks(col[~nan]) + n_nan
        else:
            r = _average_ranks(col)
        total += r
    return total


# --------------------------------------------------------------------------------------
# model-level helpers
# --------------------------------------------------------------------------------------


def _ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, **kw: Any):
    """Resolve :func:`fastntk.ntk` lazily (metrics sits above the engine, import-cycle safe)."""
    from fastntk.engine import ntk

    return ntk(model, x1, x2, **kw)


#: The BatchNorm modes of :func:`fastntk.ntk` (``bn=``).
BN_MODES = ("eval", "batch", "per_sample")


def _check_errors(errors: Any) -> None:
    if errors not in ("raise", "nan"):
        raise OptionError(f"errors must be 'raise' or 'nan', got {errors!r}")


def _ntk_kwargs(bn: str, params: Any, output: Any, dtype: Any, chunk_size: Any) -> dict:
    if bn not in BN_MODES:
        raise OptionError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if isinstance(output, str) and output == "full":
        raise OptionError("metrics need a (N, N) kernel: output='full' is not accepted")
    kw: dict[str, Any] = {"output": output, "bn": bn, "params": params}
    if dtype is not None:
        kw["dtype"] = dtype
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size
    return kw


def _kernel(model: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """Θ(x, x) on the CPU in the engine's computation dtype, which sets the spectral
    metrics' rounding tolerance (one engine call; with ``bn="batch"`` x is one BN batch)."""
    return _ntk(model, x, None, **kw).detach().cpu()


def _joint(
    model: nn.Module, x: torch.Tensor, extras: Sequence[torch.Tensor], kw: dict
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Θ(x, x) and the cross kernels Θ(e, x), all blocks of ONE engine call on [x; e...].

    With sample-independent BatchNorm (``eval``, ``per_sample``) every block equals the
    kernel computed on its own. With ``bn="batch"`` the concatenated batch is one
    BatchNorm batch (the engine's cross-kernel convention: "x1 and x2 form one batch"),
    so the blocks are a single, consistent kernel of one network function.
    """
    n = x.shape[0]
    for e in extras:
        if e.shape[1:] != x.shape[1:] or e.dtype != x.dtype:
            raise InputError(
                f"the test batch has per-sample shape {tuple(e.shape[1:])} ({e.dtype}) but the "
                f"train batch {tuple(x.shape[1:])} ({x.dtype}): both must match"
            )
    big = _kernel(model, torch.cat([x, *extras], dim=0), kw)
    out = []
    start = n
    for e in extras:
        out.append(big[start : start + e.shape[0], :n])
        start += e.shape[0]
    return big[:n, :n], out


def _centred_one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """TEG-NAS targets: one-hot minus 1/K, float64, (N, K)."""
    return F.one_hot(y, num_classes).to(torch.float64) - 1.0 / num_classes


def _solve_psd(K: torch.Tensor, B: torch.Tensor, jitter: float) -> torch.Tensor:
    """Solve ``(K + ε I) A = B`` by Cholesky, ``ε = jitter · mean(diag K)``.

    If the factorisation fails, ε is multiplied by 10, at most 6 times (up to
    ``1e6 · jitter · mean(diag K)``); then :class:`InputError`. Never forms ``K⁻¹``.
    """
    n = K.shape[0]
    Ks = (K + K.T) / 2
    scale = float(torch.diagonal(Ks).mean())
    if not scale > 0.0:
        raise InputError("kernel regression needs a positive-diagonal train kernel Θ(train, train)")
    jitter = _nonneg(jitter, "jitter")
    eye = torch.eye(n, dtype=Ks.dtype)
    eps = jitter * scale
    for _ in range(7):
        L, info = torch.linalg.cholesky_ex(Ks + eps * eye)
        if int(info) == 0:
            return torch.cholesky_solve(B, L)
        eps = eps * 10.0 if eps > 0 else 1e-12 * scale
    raise InputError(
        f"Θ(train, train) is not positive definite even with jitter {eps / 10:.3g}; "
        "kernel regression failed"
    )


# The NTK-score paper's Eq. 9 defines S_e = -CrossEntropy(...) and says "the smaller
# the S_e, the stronger the expressivity", while its §5.3 says "a higher S_e indicates
# the network's enhanced ability ... leading to higher accuracy". fastntk always returns
# Eq. 9's value; the direction used by `borda`/search is this constant, settled by the
# NAS-Bench-201 measurement in bench/nb201_metric_correlation.py: 200 sampled
# architectures at initialisation, 64 bundled CIFAR-10 images (train) + 64 (test),
# eval BatchNorm, 2-core CPU, rerun 2026-12-02 at commit 3862131 (bench/results/
# nb201_metric_correlation.md): Kendall tau of S_e with CIFAR-10 accuracy is -0.351 over
# the 194 networks whose kernel is not constant (-0.272 at commit 0dc0fb0, when S_e scored
# the 6 constant ones too), so *lower* S_e goes with higher accuracy, as Eq. 9's sentence
# says.
EXPRESSIVITY_HIGHER_IS_BETTER = False

# Revisions of metric definitions whose values changed for some networks: search
# journals key on them (fastntk.cli), so scores stored before a change are not served as
# today's. Revision 2 of S_e and S_g: NaN for a constant train kernel (they had scored
# networks whose output ignores the input as the best).
REVISIONS: dict[str, int] = {"expressivity": 2, "generalization": 2}


def _regression_scores(
    K_tr: torch.Tensor,
    K_te_tr: torch.Tensor,
    K_pe_tr: torch.Tensor | None,
    y_train: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    jitter: float,
) -> tuple[float | None, float]:
    """``(S_e, S_g)`` (Eq. 9, 10) by kernel regression, in float64; S_e is None without
    the perturbed test kernel. Neither needs an eigenvalue (S_t's spectrum check can fail
    where they are defined). A constant Θ(train, train) (a network whose output does not
    depend on its input: a NAS-Bench-201 cell with no path from input to output) makes
    both undefined, as LGA: the regression then predicts the same for every input, and
    S_e and S_g would score it as the most expressive and best generalising."""
    if float(K_tr.max()) == float(K_tr.min()):
        raise InputError(
            "kernel regression (S_e, S_g) is undefined: Θ(train, train) is constant (the "
            "network's output does not depend on its input)"
        )
    Y_tr = _centred_one_hot(y_train, num_classes)
    Y_te = _centred_one_hot(y_test, num_classes)
    alpha = _solve_psd(K_tr.double(), Y_tr, jitter)  # Θ_tr⁻¹ Ỹ_train, (n_train, K)
    f_te = K_te_tr.double() @ alpha  # Eq. 6
    S_g = float(torch.linalg.vector_norm(f_te - Y_te))  # Eq. 10
    if K_pe_tr is None:
        return None, S_g
    f_pe = K_pe_tr.double() @ alpha  # Eq. 8
    p = torch.softmax(f_te, dim=1)
    log_q = torch.log_softmax(f_pe, dim=1)
    ce = float(-(p * log_q).sum(dim=1).mean())
    return -ce, S_g  # Eq. 9


def _resolve_classes(num_classes: int | None, *ys: torch.Tensor) -> int:
    hi = max(int(y.max()) for y in ys) + 1
    lo = min(int(y.min()) for y in ys)
    if lo < 0:
        raise InputError(f"class labels must be >= 0, got {lo}")
    if num_classes is None:
        num_classes = hi
    elif (num_classes := _args.integer(num_classes, "num_classes")) < hi:
        raise InputError(f"label {hi - 1} out of range for num_classes = {num_classes}")
    if num_classes < 2:
        raise InputError("the NTK-score needs at least two classes")
    return num_classes


def _perturb(x: torch.Tensor, noise_std: float, seed: int) -> torch.Tensor:
    if not x.is_floating_point():
        raise InputError(
            "expressivity (S_e) perturbs the test inputs with Gaussian noise (Eq. 7), which "
            f"{x.dtype} token ids cannot take; leave it out (e.g. names='trainability,"
            "generalization' in compute_metrics)"
        )
    g = torch.Generator(device="cpu").manual_seed(_args.integer(seed, "seed"))
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    return x + noise_std * eps


def _check_batch(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{what} must be a torch.Tensor, got {type(x)}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise InputError(f"{what} is an empty batch (shape {tuple(x.shape)})")
    if not (x.is_floating_point() or _model._is_index(x)):
        raise InputTypeError(f"{what} must be floating point (or integer token ids for "
                             f"models with nn.Embedding), got {x.dtype}")  # fmt: skip
    return x


def ntk_score(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: Any,
    x_test: torch.Tensor,
    y_test: Any,
    *,
    num_classes: int | None = None,
    noise_std: float = 1e-2,
    seed: int = 0,
    jitter: float = 1e-6,
    rtol: float | None = None,
    bn: str = "eval",
    params: Any = None,
    output: Any = "sum",
    dtype: Any = None,
    chunk_size: int | None = None,
) -> tuple[float, float, float]:
    """NTK-score ``(S_t, S_e, S_g)`` of the NTK-score (SABoC-NAS) paper, §4.1.

    * ``S_t = trainability(Θ(train, train))`` (Eq. 5).
    * Kernel regression (Eq. 6, 8): ``f(X) = Θ(X, train) (Θ(train, train) + εI)⁻¹ Ỹ_train``
      solved by Cholesky (:func:`_solve_psd`: ``ε = jitter · mean(diag Θ(train, train))``,
      escalated ×10 only if the factorisation fails), with ``Ỹ`` the centred one-hot
      labels (one-hot − 1/K, as TEG-NAS).
    * ``X_test' = X_test + ε``, ``ε ~ N(0, noise_std²)`` drawn from a CPU generator seeded
      with ``seed`` (default std 1e-2: variance 1e-4 as Eq. 7).
    * ``S_e = -CE`` (Eq. 9) with ``CE = mean_i(-Σ_k p_ik log q_ik)``, ``p = softmax(f(X_test))``,
      ``q = softmax(f(X_test'))``. Its direction is :data:`EXPRESSIVITY_HIGHER_IS_BETTER`.
    * ``S_g = ‖f(X_test) − Ỹ_test‖₂`` (Eq. 10): the 2-norm over all n_test × K entries,
      not squared, not averaged; lower is better.
    * A constant Θ(train, train) (the output does not depend on the input) leaves S_e and
      S_g undefined: :class:`InputError` (NaN under ``errors="nan"`` in
      :func:`compute_metrics`, so search ranks such a network last on them).

    Kernels: Θ(train, train), Θ(test, train), Θ(test', train) are blocks of ONE engine call
    on [train; test; test']. With ``bn="batch"`` that concatenation is one BatchNorm batch
    (the engine's cross-kernel convention), and ``S_t`` is taken from a second call
    Θ(train, train) on the train batch alone, so that it equals ``trainability`` of the
    train kernel. The model is not changed.

    ``num_classes``: K of the one-hot targets; None takes the largest label in ``y_train``
    and ``y_test`` plus one (S_g depends on K through the centring 1/K).

    Returns:
        ``(S_t, S_e, S_g)`` as Python floats.
    """
    x_train = _check_batch(x_train, "x_train")
    x_test = _check_batch(x_test, "x_test")
    ytr = _check_labels(y_train, x_train.shape[0], "y_train")
    yte = _check_labels(y_test, x_test.shape[0], "y_test")
    num_classes = _resolve_classes(num_classes, ytr, yte)
    noise_std = _nonneg(noise_std, "noise_std")
    jitter = _nonneg(jitter, "jitter")
    kw = _ntk_kwargs(bn, params, output, dtype, chunk_size)
    x_pert = _perturb(x_test, noise_std, seed)
    K_tr, (K_te, K_pe) = _joint(model, x_train, [x_test, x_pert], kw)
    K_st = _kernel(model, x_train, kw) if bn == "batch" else K_tr
    S_e, S_g = _regression_scores(K_tr, K_te, K_pe, ytr, yte, num_classes, jitter)
    assert S_e is not None
    return trainability(K_st, rtol=rtol), S_e, S_g


# --------------------------------------------------------------------------------------
# ViNTK (fastntk's reading of the abstract)
# --------------------------------------------------------------------------------------


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
    x = _check_batch(x, "x")
    if not x.is_floating_point():
        raise InputError(
            f"highpass filters images; {x.dtype} token ids have no spatial frequencies (the "
            "filtered ids would be other, even negative, ids): leave vintk out for token models"
        )
    if x.dim() < 3:
        raise InputError(f"highpass needs (N, C, *spatial) inputs, got shape {tuple(x.shape)}")
    cutoff = _nonneg(cutoff, "cutoff")
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
    x = _check_batch(x, "x")
    beta = _nonneg(beta, "beta")
    kw = {**_ntk_kwargs(bn, params, output, dtype, chunk_size), "progress": progress}
    xh = highpass(x, cutoff)
    if kernel is None:
        K = _kernel(model, x, kw)
    else:
        K = _as_tensor(kernel, "kernel").cpu()  # (the high-pass kernel is a CPU one)
        _check_kernel(K, "kernel")
        if K.shape[0] != x.shape[0]:
            raise InputError(f"kernel is {tuple(K.shape)} but x has N = {x.shape[0]}")
    eps = _eps_of(K)
    if beta == 0:
        return K.double(), eps
    Kh = _kernel(model, xh, kw)
    return K.double() + beta * Kh.double(), max(eps, _eps_of(Kh))


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
    if singular not in _SINGULAR_MODES:
        raise OptionError(f"singular must be one of {_SINGULAR_MODES}, got {singular!r}")
    if rtol is not None:
        _check_rtol(rtol)
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


# --------------------------------------------------------------------------------------
# registry and compute_metrics
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """How a metric named on the command line is computed.

    Attributes:
        name: the command-line name.
        kind: ``"kernel"`` (a function of Θ(x, x) and maybe y, shared kernel),
            ``"ntk_score"`` (needs the kernel-regression kernels), ``"vintk"``,
            ``"evolution"`` (a kernel after training: :func:`kernel_evolution`) or
            ``"model"`` (a property of the model alone: its parameter count).
        higher_is_better: direction for ranking / Borda.
        needs_labels: whether y is required.
        fn: for ``kind == "kernel"``: ``fn(K, y, opts) -> float``.
        doc: one line.
    """

    name: str
    kind: str
    higher_is_better: bool
    needs_labels: bool
    fn: Callable[..., float] | None = None
    doc: str = ""


METRICS: dict[str, MetricSpec] = {
    "fnorm": MetricSpec("fnorm", "kernel", True, False, lambda K, y, o: fnorm(K), "‖Θ‖_F"),
    "mean": MetricSpec("mean", "kernel", True, False, lambda K, y, o: mean(K), "mean(Θ)"),
    "ncn": MetricSpec(
        "ncn",
        "kernel",
        True,
        False,
        lambda K, y, o: ncn(K, rtol=o["rtol"], singular=o["singular"]),
        "-λmax/λmin",
    ),
    "cond": MetricSpec(
        "cond",
        "kernel",
        False,
        False,
        lambda K, y, o: condition_number(K, rtol=o["rtol"], singular=o["singular"]),
        "λmax/λmin",
    ),
    "lga": MetricSpec("lga", "kernel", True, True, lambda K, y, o: lga(K, y), "LGA, Eq. 12"),
    "trainability": MetricSpec(
        "trainability",
        "kernel",
        False,
        False,
        lambda K, y, o: trainability(K, rtol=o["rtol"]),
        "NTK-score S_t of Θ(x, x)",
    ),
    "expressivity": MetricSpec(
        "expressivity",
        "ntk_score",
        EXPRESSIVITY_HIGHER_IS_BETTER,
        True,
        None,
        "NTK-score S_e = -CE (Eq. 9)",
    ),
    "generalization": MetricSpec(
        "generalization", "ntk_score", False, True, None, "NTK-score S_g (Eq. 10)"
    ),
    "vintk": MetricSpec("vintk", "vintk", True, False, None, "fastntk ViNTK: -cond(Θ_vi)"),
    "lga_t": MetricSpec(
        "lga_t", "evolution", True, True, None, "LGA after t epochs of the LGA paper's training"
    ),
    "num_params": MetricSpec(
        "num_params", "model", True, False, None, "number of parameters (zero-cost baseline)"
    ),
}

#: The NAS preset of :func:`compute_metrics`: ``compute_metrics(model, x, y, NAS_METRICS,
#: **NAS)`` scores an architecture the way that measured best against NAS-Bench-201 accuracy
#: (``bench/results/nb201_space.md``; ``fastntk score|search|evaluate`` and
#: :data:`fastntk.adapters.MEASURES` use it). Each sample's BatchNorm uses its own
#: statistics: the papers' train-mode ranking (τ within noise of the coupled batch kernel)
#: at the cost of an eval-mode kernel, where running statistics rank LGA and F-Norm
#: backwards. The engine's own default (``fastntk.ntk``: the function as it is, ``bn="eval"``)
#: is not this.
NAS: dict[str, Any] = {"bn": "per_sample", "params": None}

#: The default NAS score: the Borda count of these metrics (see :data:`NAS`).
NAS_METRICS: tuple[str, ...] = ("ncn", "lga", "num_params")

# Metric groups: a name that expands to several metrics.
_GROUPS: dict[str, tuple[str, ...]] = {
    "ntk_score": ("trainability", "expressivity", "generalization"),
}

#: metric name -> higher_is_better, for :func:`borda` and the search layer.
DIRECTIONS: dict[str, bool] = {name: spec.higher_is_better for name, spec in METRICS.items()}


def _expand(names: Iterable[str] | str) -> list[str]:
    if isinstance(names, str):
        names = [s.strip() for s in names.split(",") if s.strip()]
    elif not isinstance(names, Iterable) or not all(isinstance(nm, str) for nm in names):
        raise OptionError(f"metric names must be a string or a list of strings, got {names!r}")
    out: list[str] = []
    for nm in names:
        for m in _GROUPS.get(nm, (nm,)):
            if m not in METRICS:
                known = sorted([*METRICS, *_GROUPS])
                raise OptionError(f"unknown metric {m!r}; known: {', '.join(known)}")
            if m not in out:
                out.append(m)
    if not out:
        raise OptionError("no metric requested")
    return out


def expand_metrics(names: Iterable[str] | str) -> list[str]:
    """Metric names from a list or a comma-separated string, groups expanded, deduplicated.

    ``"ntk_score"`` expands to ``trainability, expressivity, generalization``. Unknown
    names raise :class:`OptionError` listing the known ones.
    """
    return _expand(names)


def compute_metrics(
    model: nn.Module,
    x: torch.Tensor,
    y: Any = None,
    names: Iterable[str] | str = ("fnorm", "mean", "ncn", "lga"),
    *,
    bn: str = "eval",
    params: Any = None,
    output: Any = "sum",
    dtype: Any = None,
    chunk_size: int | None = None,
    x_test: torch.Tensor | None = None,
    y_test: Any = None,
    num_classes: int | None = None,
    noise_std: float = 1e-2,
    seed: int = 0,
    jitter: float = 1e-6,
    rtol: float | None = None,
    singular: str = "inf",
    cutoff: float = 0.25,
    beta: float = 1.0,
    errors: str = "raise",
    progress: bool | None = None,
    lga_epochs: int = 1,
    train_x: torch.Tensor | None = None,
    train_y: Any = None,
    train_batch_size: int = 1024,
) -> dict[str, float]:
    """Compute the requested metrics of one model, computing each kernel once.

    * Kernel metrics (fnorm, mean, ncn, cond, lga, trainability) all use ONE kernel
      ``Θ(x, x)`` (with ``bn="batch"``: x is one BatchNorm batch).
    * ``expressivity`` / ``generalization`` (and the group ``ntk_score``, which expands to
      trainability, expressivity, generalization) use kernel regression from a train
      batch to a test batch. If ``x_test`` is None the batch is split: train =
      ``x[:N - N//2]``, test = ``x[N - N//2:]``; Θ(train, train) and Θ(test, train) are then
      blocks of the same kernel. Either way the regression kernels are blocks of one
      engine call on [x; x_test; x_test'] (see :func:`ntk_score`); with ``bn`` eval or
      per_sample that same call also gives Θ(x, x), so all kernel metrics plus S_e, S_g
      cost one call; with ``bn="batch"`` Θ(x, x) is a second call. ``trainability`` is
      always ``S_t(Θ(x, x))`` (use :func:`ntk_score` for S_t of the train batch alone).
    * ``vintk`` needs one extra kernel Θ(hp(x), hp(x)).
    * ``lga_t`` is LGA_t, the LGA paper's main metric: the LGA of Θ_t(x, x) after
      ``lga_epochs`` epochs of the paper's training recipe on ``(train_x, train_y)``
      (default: x, y) in minibatches of ``train_batch_size``, via :func:`kernel_evolution`
      on a copy (seeded with ``seed``; the user's model is not trained).
    * ``num_params`` is the number of parameters of the model (every parameter, whatever
      ``params`` selects): the zero-cost baseline a training-free metric must beat.

    Args:
        model: the network (not changed).
        x: (N, ...) batch; y: (N,) labels (needed by lga, expressivity, generalization).
        names: metric names (or a comma-separated string); see :data:`METRICS`.
        errors: ``"raise"`` (default) or ``"nan"``: a metric whose computation raises a
            fastntk :class:`InputError` or :class:`NonFiniteKernelError` (a kernel that
            overflows, an architecture whose labels or kernel do not allow it) is
            recorded as ``float("nan")`` instead; a search then ranks it last.
        progress: the engine's progress bar (:func:`fastntk.ntk`'s ``progress``).

    Returns:
        ``{name: value}`` in the order requested (groups expanded).
    """
    wanted = _expand(names)
    _check_errors(errors)
    lga_epochs = _args.integer(lga_epochs, "lga_epochs", 0)
    train_batch_size = _args.integer(train_batch_size, "train_batch_size", 1)
    noise_std = _nonneg(noise_std, "noise_std")
    jitter = _nonneg(jitter, "jitter")
    if rtol is not None:
        _check_rtol(rtol)
    if singular not in _SINGULAR_MODES:
        raise OptionError(f"singular must be one of {_SINGULAR_MODES}, got {singular!r}")
    x = _check_batch(x, "x")
    kw = {**_ntk_kwargs(bn, params, output, dtype, chunk_size), "progress": progress}
    n = x.shape[0]
    yt = None
    if any(METRICS[m].needs_labels for m in wanted):
        if y is None:
            need = [m for m in wanted if METRICS[m].needs_labels]
            raise InputError(f"metrics {need} need labels y")
        yt = _check_labels(y, n, "y")
    opts = {"rtol": rtol, "singular": singular}
    need_K = any(METRICS[m].kind in ("kernel", "vintk") for m in wanted)
    need_reg = any(METRICS[m].kind == "ntk_score" for m in wanted)
    need_e = "expressivity" in wanted  # the perturbed test batch (S_e only)

    K = None
    reg = None
    failed = False  # errors="nan": the kernels could not be computed (all metrics NaN)
    undefined: set[str] = set()  # errors="nan": metrics whose own inputs are unusable
    regression = [m for m, spec in METRICS.items() if spec.kind == "ntk_score"]  # S_e, S_g

    def _or_undefined(fn: Callable[[], Any], names: Sequence[str]) -> Any:
        """``fn()``; under errors="nan" an InputError of these metrics' own inputs (the
        regression's labels, split and test batch; S_e's perturbed batch) marks only
        ``names`` as undefined (None)."""
        try:
            return fn()
        except InputError:
            if errors == "raise":
                raise
            undefined.update(names)
            return None

    try:
        if need_reg:
            assert yt is not None

            def _batches() -> tuple:  # (x_test or None for the split, y_test, y_train)
                if x_test is None:
                    n_te = n // 2
                    if n_te < 1:
                        raise InputError("expressivity/generalization need N >= 2 to split x")
                    return None, yt[n - n_te :], yt[: n - n_te]
                xte = _check_batch(x_test, "x_test")
                if y_test is None:
                    raise InputError("x_test given without y_test")
                return xte, _check_labels(y_test, xte.shape[0], "y_test"), yt

            got = _or_undefined(_batches, regression)
            if got is not None:
                xte, yte, ytr = got
                pert: list[torch.Tensor] = []
                if need_e:  # only S_e needs the perturbed test batch (token ids take none)
                    xe = x[ytr.shape[0] :] if xte is None else xte
                    xp = _or_undefined(lambda: _perturb(xe, noise_std, seed), ["expressivity"])
                    pert = [] if xp is None else [xp]
                if xte is None:  # the split: blocks of one kernel of x (and x_test')
                    n_tr = ytr.shape[0]
                    Kx, pe = _joint(model, x, pert, kw)
                    K_tr, K_te = Kx[:n_tr, :n_tr], Kx[n_tr:, :n_tr]
                    K_pe = pe[0][:, :n_tr] if pert else None
                else:
                    Kx, (K_te, *pe) = _joint(model, x, [xte, *pert], kw)
                    K_tr, K_pe = Kx, (pe[0] if pert else None)
                if bn != "batch":
                    K = Kx  # sample-independent BN: the x block IS Θ(x, x)
                ncls = _or_undefined(lambda: _resolve_classes(num_classes, ytr, yte), regression)
                if ncls is not None:

                    def _reg() -> tuple[float | None, float]:
                        return _regression_scores(K_tr, K_te, K_pe, ytr, yte, ncls, jitter)

                    reg = _reg
        if need_K and K is None:
            K = _kernel(model, x, kw)
    except (InputError, NonFiniteKernelError):
        if errors == "raise":
            raise
        failed = True

    out: dict[str, float] = {}
    reg_vals: tuple[float | None, float] | None = None
    for m in wanted:
        spec = METRICS[m]
        if failed or m in undefined:
            out[m] = float("nan")
            continue
        try:
            if spec.kind == "kernel":
                assert spec.fn is not None
                out[m] = float(spec.fn(K, yt, opts))
            elif spec.kind == "ntk_score":
                if reg_vals is None:
                    assert reg is not None
                    reg_vals = reg()
                out[m] = reg_vals[0] if m == "expressivity" else reg_vals[1]  # type: ignore[assignment]
            elif spec.kind == "model":
                out[m] = float(sum(p.numel() for p in model.parameters()))
            elif spec.kind == "evolution":
                evo = kernel_evolution(
                    model,
                    x,
                    yt,
                    times=(lga_epochs,),
                    train_x=train_x,
                    train_y=train_y,
                    batch_size=train_batch_size,
                    seed=seed,
                    bn=bn,
                    params=params,
                    output=output,
                    dtype=dtype,
                    chunk_size=chunk_size,
                )
                out[m] = evo.lga[-1]
            else:  # vintk
                out[m] = vintk(
                    model,
                    x,
                    kernel=K,
                    cutoff=cutoff,
                    beta=beta,
                    rtol=rtol,
                    singular=singular,
                    bn=bn,
                    params=params,
                    output=output,
                    dtype=dtype,
                    chunk_size=chunk_size,
                    progress=progress,
                )
        except (InputError, NonFiniteKernelError):
            if errors == "raise":
                raise
            out[m] = float("nan")
    return out


# --------------------------------------------------------------------------------------
# kernel evolution (LGA paper §4.1 / §4.3)
# --------------------------------------------------------------------------------------


@dataclass
class KernelEvolution:
    """Kernels and metrics of a model trained for ``times`` steps or epochs.

    Attributes:
        times: sorted times (0 first), in ``unit``.
        unit: ``"step"`` or ``"epoch"``.
        kernels: Θ_t(x, x) for each time, float64 CPU (N, N).
        lga: LGA_t (Eq. 12) for each time.
        kernel_correlation: Pearson(Θ_0, Θ_t) for each time (1 at t = 0).
        relative_difference: ‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F for each time (0 at t = 0).
        train_loss: mean training loss over the step/epoch just before each time
            (NaN at t = 0: no training yet).
    """

    times: list[int]
    unit: str
    kernels: list[torch.Tensor] = field(repr=False)
    lga: list[float]
    kernel_correlation: list[float]
    relative_difference: list[float]
    train_loss: list[float]


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[-1]
    return out


# kernel_evolution seeds torch's process-wide generator for its copy's dropout (inside
# fork_rng): two calls at once would restore each other's state; they take turns.
_RNG_LOCK = threading.Lock()


@_model.with_grad
def kernel_evolution(
    model: nn.Module,
    x: torch.Tensor,
    y: Any,
    *,
    times: Sequence[int] = (0, 1),
    unit: str = "epoch",
    train_x: torch.Tensor | None = None,
    train_y: Any = None,
    batch_size: int = 1024,
    lr: float = 0.025,
    momentum: float = 0.9,
    weight_decay: float = 3e-4,
    seed: int = 0,
    bn: str = "eval",
    params: Any = None,
    output: Any = "sum",
    dtype: Any = None,
    chunk_size: int | None = None,
) -> KernelEvolution:
    """Train a deep copy of ``model`` and track its NTK on a probe batch (LGA paper §4).

    Recipe (LGA paper appendix, Section 4.3): SGD, ``lr 0.025``, momentum 0.9, weight
    decay 3e-4, cross-entropy on the logits (last element of a tuple output), minibatches
    of ``batch_size`` (1024 in the paper) from ``(train_x, train_y)`` (default: the probe
    batch itself), reshuffled each epoch by a CPU generator seeded with ``seed``; the
    global RNG (dropout, ...) is seeded with ``seed`` inside ``torch.random.fork_rng`` so
    the caller's RNG state is untouched (calls take turns on it; a draw from another
    thread while a call trains still moves the shared generator, and the copy's dropout
    with it). The copy trains in train mode; each kernel is
    computed on the copy with ``bn`` (eval mode then uses the copy's updated running
    statistics, as the paper's Eval-mode BN after training).

    Args:
        x, y: probe batch (N, ...) and its labels (N,), where the NTK is measured.
        times: non-negative step/epoch counts at which to measure; 0 is always added.
        unit: ``"step"`` (one SGD update on one minibatch) or ``"epoch"`` (one pass over
            the training data, the last partial minibatch kept).

    Returns:
        :class:`KernelEvolution`. The user's model (parameters, buffers, gradients,
        training flag) is not changed.
    """
    _model.check_model(model)
    x = _model.plain(_check_batch(x, "x"))
    yt = _check_labels(y, x.shape[0], "y")
    if unit not in ("step", "epoch"):
        raise OptionError(f"unit must be 'step' or 'epoch', got {unit!r}")
    if isinstance(times, (str, bytes)) or not isinstance(times, Iterable):
        raise OptionError(f"times must be a sequence of non-negative integers, got {times!r}")
    ts = sorted({0, *(_args.integer(t, "each of times", 0) for t in times)})
    batch_size = _args.integer(batch_size, "batch_size", 1)
    if not (isinstance(lr, numbers.Real) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
        raise OptionError(f"lr must be a finite number > 0, got {lr!r}")
    momentum = _nonneg(momentum, "momentum")
    weight_decay = _nonneg(weight_decay, "weight_decay")
    if train_x is None:
        tx, ty = x, yt
    else:
        tx = _model.plain(_check_batch(train_x, "train_x"))
        ty = _check_labels(train_y, tx.shape[0], "train_y")
    kw = _ntk_kwargs(bn, params, output, dtype, chunk_size)
    if int(ty.min()) < 0:
        raise InputError(f"class labels must be >= 0, got {int(ty.min())}")

    seed = _args.integer(seed, "seed", -(2**63), 2**64)  # (what torch.manual_seed takes)
    with _model.locked(model):  # not a copy of another call's temporary modes and forwards
        net = copy.deepcopy(model)
    for p in net.parameters():
        p.grad = None
    for m in net.modules():  # the user's backward hooks stay with the user's model (as ntk)
        _model.clear_backward_hooks(m)
    try:
        dev = next(net.parameters()).device
    except StopIteration as e:
        raise InputError("model has no parameters") from e
    tx_d = tx.to(dev)
    ty_d = ty.to(dev)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n_train = tx.shape[0]

    def _batches():
        while True:
            perm = torch.randperm(n_train, generator=gen)
            for s in range(0, n_train, batch_size):
                yield perm[s : s + batch_size]

    def _epoch_len() -> int:
        return math.ceil(n_train / batch_size)

    kernels: list[torch.Tensor] = []
    losses: list[float] = []
    batches = _batches()
    done = 0  # steps or epochs done
    # the copy's RNG draws (dropout) on its own device's generator, saved and restored
    # with the CPU's; torch.manual_seed would reseed every GPU's generator for good
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if (
        dev.type == "cuda"
    ) else []
    with _RNG_LOCK, torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for i in cuda:
            with torch.cuda.device(i):
                torch.cuda.manual_seed(seed)
        for t in ts:
            last: list[float] = []
            while done < t:
                n_steps = 1 if unit == "step" else _epoch_len()
                last = []
                net.train()
                for _ in range(n_steps):
                    idx = next(batches).to(dev)
                    opt.zero_grad(set_to_none=True)
                    logits = _logits(net(tx_d[idx]))
                    if int(ty_d[idx].max()) >= logits.shape[-1]:
                        raise InputError(
                            f"label {int(ty_d[idx].max())} is out of range for the model's "
                            f"{logits.shape[-1]} logits (cross-entropy training)"
                        )
                    loss = F.cross_entropy(logits, ty_d[idx])
                    loss.backward()
                    opt.step()
                    last.append(float(loss.detach()))
                done += 1
            opt.zero_grad(set_to_none=True)
            net.train(model.training)  # measure in the user's mode, as compute_metrics does
            losses.append(float(np.mean(last)) if last else float("nan"))
            kernels.append(_ntk(net, x, None, **kw).detach().double().cpu())
    K0 = kernels[0]
    return KernelEvolution(
        times=ts,
        unit=unit,
        kernels=kernels,
        lga=[lga(K, yt) for K in kernels],
        kernel_correlation=[kernel_correlation(K0, K) for K in kernels],
        relative_difference=[relative_kernel_difference(K0, K) for K in kernels],
        train_loss=losses,
    )
