"""Kernel metrics of a sketched kernel Θ̂ = S Sᵀ (:func:`fastntk.ntk_sketch`), for N too
large for the (N, N) kernel."""

from __future__ import annotations

import math
from typing import Any

import torch

from fastntk import _args
from fastntk.errors import InputError
from fastntk.metrics.checks import as_tensor, check_finite, check_labels
from fastntk.metrics.kernel import frobenius

__all__ = ["sketch_metrics"]


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
    t = as_tensor(S, "sketch")
    if t.dim() != 2 or t.numel() == 0:
        raise InputError(
            f"sketch must be a non-empty 2-D (N, m) tensor, got shape {tuple(t.shape)}"
        )
    check_finite(t, "sketch")
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
    out["fnorm"] = frobenius(gram) * top**2
    total = float(col_sum @ col_sum)  # ΣΘ̂ / top²
    out["mean"] = total / n**2 * top**2
    lam = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp_min(0.0).flip(0)
    trace = float(gram.diagonal().sum())
    k = math.ceil(math.sqrt(n))
    out["trainability"] = min(1.0, float(lam[:k].sum()) / trace)
    if y is not None:
        yt = check_labels(y, n)
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
