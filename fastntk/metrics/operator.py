"""Kernel metrics from the NTK operator (:func:`fastntk.ntk_operator`) and the exact
diagonal (:func:`fastntk.ntk_diag`), without the N×N matrix.

Each returns an :class:`Estimate`: the value, whether it is exact, an error bound where it
is not, and the number of operator columns (products Θ v) it took.

* :func:`top_eigenvalues`: the k largest eigenvalues by Lanczos (``scipy.sparse.linalg
  .eigsh``); the bound is the largest residual ``‖Θ v − λ v‖`` of the Ritz pairs, which
  for a symmetric Θ bounds each Ritz value's distance to an eigenvalue (Weyl).
* :func:`trace`: Σ_i Θ_ii from the diagonal: exact, no product.
* :func:`frobenius`: ‖Θ − c 11ᵀ‖_F by Hutch++ (Meyer, Musco, Musco & Woodruff, 2021):
  ``‖B‖_F² = ‖B Q‖_F² + ‖B (I − QQᵀ)‖_F²`` with Q an orthonormal basis of ``B S`` (S
  Gaussian, s columns): the first term exact, the second Hutchinson's mean of
  ``‖B (I − QQᵀ) g‖²`` over t Gaussian g, whose standard error times 3 is the stated
  bound (a ~99.7% bound; 0 where the remainder vanishes).
* :func:`lga`: the LGA paper's Eq. 12 (the Pearson correlation of the entries of Θ and of
  the label matrix L = 2 Y Yᵀ − 11ᵀ): its numerator ``2 Σ_c y_cᵀ Θ y_c − (1 + μ_L) 1ᵀ Θ 1``
  takes C products (Σ_c y_c = 1), exactly; its denominator ‖Θ − μ_Θ 11ᵀ‖_F the Hutch++
  estimate, whose bound carries over.
* :func:`trainability`: S_t = Σ of the ⌈√N⌉ largest eigenvalues over the trace.
* :func:`regression_scores`: S_e and S_g (NTK-score, Eq. 9 and 10) by kernel regression
  solved with conjugate gradients, to the stated relative residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastntk.errors import InputError


@dataclass(frozen=True)
class Estimate:
    """A metric from the operator: ``value``; ``exact`` (up to floating point) or not;
    ``bound``: the stated bound on ``|value − true value|`` (0 when exact); ``products``:
    the operator columns it took."""

    value: float
    exact: bool
    bound: float
    products: int


def _products(A) -> int:
    """Columns multiplied so far by ``A`` (and its transpose, where it counts them)."""
    return getattr(A, "products_total", A.products)


def top_eigenvalues(
    A, k: int = 1, *, tol: float = 1e-10, seed: int = 0
) -> tuple[np.ndarray, Estimate]:
    """(the k largest eigenvalues of the symmetric Θ, descending; an Estimate of λmax)."""
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    n = A.shape[0]
    if A.shape[0] != A.shape[1]:
        raise InputError("eigenvalues need a square operator Θ(x, x)")
    before = _products(A)
    L = A.to_scipy()
    v0 = np.random.default_rng(seed).standard_normal(n)
    if k >= n - 1:  # (ARPACK needs k < n: the few-sample case forms the n×n matrix)
        D = L @ np.eye(n)
        lam, vecs = np.linalg.eigh((D + D.T) / 2)
        lam, vecs = lam[::-1][:k], vecs[:, ::-1][:, :k]
    else:
        try:
            lam, vecs = eigsh(L, k=k, which="LA", tol=tol, v0=v0)
        except ArpackNoConvergence as e:
            lam, vecs = e.eigenvalues, e.eigenvectors
        order = np.argsort(lam)[::-1]
        lam, vecs = lam[order], vecs[:, order]
    R = L @ vecs - vecs * lam  # residuals of the Ritz pairs
    bound = float(np.linalg.norm(R, axis=0).max()) if R.size else 0.0
    est = Estimate(float(lam[0]), False, bound, _products(A) - before)
    return lam, est


def trace(diag: torch.Tensor) -> Estimate:
    """Σ_i Θ_ii from :func:`fastntk.ntk_diag`'s diagonal (exact)."""
    return Estimate(float(diag.double().sum()), True, 0.0, 0)


def frobenius(A, *, shift: float = 0.0, sketch: int = 10, samples: int = 10,
              seed: int = 0) -> Estimate:  # fmt: skip
    """‖Θ − shift·11ᵀ‖_F by Hutch++ (module docstring): 2·``sketch`` + ``samples`` products."""
    n = A.shape[0]
    g = torch.Generator().manual_seed(seed)
    ones = torch.ones(n, 1, dtype=torch.float64)
    before = _products(A)

    def B(V: torch.Tensor) -> torch.Tensor:
        out = (A @ V.to(A.dtype)).double()
        return out - shift * ones @ (ones.T @ V) if shift else out

    s = min(sketch, n)
    Q, _ = torch.linalg.qr(B(torch.randn(n, s, generator=g, dtype=torch.float64)))
    top = float(B(Q).pow(2).sum())
    if s >= n:  # Q spans everything: exact
        return Estimate(math.sqrt(top), True, 0.0, _products(A) - before)
    G = torch.randn(n, samples, generator=g, dtype=torch.float64)
    G = G - Q @ (Q.T @ G)
    rest = B(G).pow(2).sum(0)  # each an unbiased estimate of ‖B (I − QQᵀ)‖_F²
    mean = float(rest.mean())
    se = float(rest.std(unbiased=True)) / math.sqrt(samples) if samples > 1 else mean
    sq, err = top + mean, 3 * se
    value = math.sqrt(max(sq, 0.0))
    lo = math.sqrt(max(sq - err, 0.0))
    bound = max(value - lo, math.sqrt(sq + err) - value)
    return Estimate(value, False, bound, _products(A) - before)


def lga(A, y: torch.Tensor, *, sketch: int = 10, samples: int = 10, seed: int = 0) -> Estimate:
    """LGA (Eq. 12 of the LGA paper) from C + Hutch++ products (module docstring)."""
    y = torch.as_tensor(y).long().cpu()
    n = A.shape[0]
    if y.shape != (n,):
        raise InputError(f"lga needs {n} labels, got shape {tuple(y.shape)}")
    classes = torch.unique(y)
    if classes.numel() < 2:
        raise InputError("LGA needs at least two classes in the labels (L is constant)")
    before = _products(A)
    Y = (y[:, None] == classes[None, :]).double()  # (n, C) one-hot
    TY = (A @ Y.to(A.dtype)).double()  # C products
    yTy = (Y * TY).sum(0)  # y_cᵀ Θ y_c
    oneTone = float(TY.sum())  # 1ᵀ Θ 1 (Σ_c y_c = 1)
    counts = Y.sum(0)
    sumL = float(2 * (counts**2).sum() - n * n)
    mu_L, mu_T = sumL / n**2, oneTone / n**2
    num = 2 * float(yTy.sum()) - (1 + mu_L) * oneTone
    norm_L = math.sqrt(n * n - 2 * mu_L * sumL + mu_L**2 * n * n)  # ‖L − μ_L‖_F (L² = 1)
    F = frobenius(A, shift=mu_T, sketch=sketch, samples=samples, seed=seed)
    if F.value == 0.0:
        raise InputError("LGA (constant kernel): Θ − μ(Θ) is zero")
    value = num / (F.value * norm_L)
    if F.exact:
        return Estimate(value, True, 0.0, _products(A) - before)
    lo_F = max(F.value - F.bound, 1e-300)
    bound = max(
        abs(num / (lo_F * norm_L) - value), abs(num / ((F.value + F.bound) * norm_L) - value)
    )
    return Estimate(value, False, bound, _products(A) - before)


def trainability(A, diag: torch.Tensor, *, tol: float = 1e-10, seed: int = 0) -> Estimate:
    """S_t (NTK-score Eq. 5): the ⌈√N⌉ largest eigenvalues' share of the trace."""
    n = A.shape[0]
    k = math.ceil(math.sqrt(n))
    lam, est = top_eigenvalues(A, k, tol=tol, seed=seed)
    tr = float(diag.double().sum())
    R_bound = est.bound * k
    return Estimate(float(np.clip(lam, 0, None).sum()) / tr, False, R_bound / tr, est.products)


def cg(A, B: torch.Tensor, eps: float, *, rtol: float = 1e-10, maxiter: int | None = None):
    """Solve (A + eps I) X = B for each column of B by conjugate gradients (block: the
    columns' products go through the operator together). Returns (X, the largest
    relative residual reached)."""
    B = B.double()
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    bn = torch.linalg.vector_norm(B, dim=0).clamp_min(1e-300)
    maxiter = maxiter or 10 * B.shape[0]
    for _ in range(maxiter):
        if bool((rs.sqrt() / bn <= rtol).all()):
            break
        AP = (A @ P.to(A.dtype)).double() + eps * P
        alpha = rs / (P * AP).sum(0).clamp_min(1e-300)
        X += P * alpha
        R -= AP * alpha
        rs_new = (R * R).sum(0)
        P = R + P * (rs_new / rs.clamp_min(1e-300))
        rs = rs_new
    return X, float((rs.sqrt() / bn).max())


def regression_scores(model, x_train, y_train, x_test, y_test, *, num_classes: int,
                      noise_std: float = 1e-2, seed: int = 0, jitter: float = 1e-6,
                      rtol: float = 1e-10, **options) -> tuple[Estimate | None, Estimate]:  # fmt: skip
    """(S_e, S_g) of the NTK-score (Eq. 9, 10) by kernel regression from the train batch
    to the test batch, ``(Θ_tr + ε I) α = Ỹ_tr`` solved by conjugate gradients on the
    operator (ε = ``jitter`` · mean Θ_ii, the diagonal exact), then ``f = Θ(test, train) α``.
    Stated: a first-order bound from the relative residual r the solve reached (an α off
    by r moves f by at most about ‖f‖ r κ, κ ≤ max Θ_ii / ε). ``bn="batch"`` couples
    train and test in one batch: the dense path (:func:`fastntk.metrics.ntk_score`)."""
    from fastntk.engine import ntk_diag, ntk_operator
    from fastntk.metrics.ntkscore import _centred_one_hot, perturb

    if options.get("bn") == "batch":
        raise InputError("the operator's kernel regression takes bn='eval' or 'per_sample'; "
                         "bn='batch' couples train and test: use the dense ntk_score")  # fmt: skip
    A = ntk_operator(model, x_train, **options)
    d = ntk_diag(model, x_train, **options).double()
    eps = jitter * float(d.mean())
    Y_tr = _centred_one_hot(torch.as_tensor(y_train).long().cpu(), num_classes)
    Y_te = _centred_one_hot(torch.as_tensor(y_test).long().cpu(), num_classes)
    alpha, res = cg(A, Y_tr, eps, rtol=rtol)
    C = ntk_operator(model, x_test, x_train, **options)
    f_te = (C @ alpha.to(C.dtype)).double()
    S_g = float(torch.linalg.vector_norm(f_te - Y_te))
    # an α off by the residual r (relative) moves f by at most ‖C‖ ‖(A + εI)^-1‖ r ‖Ỹ‖
    bound = float(torch.linalg.vector_norm(f_te)) * res / max(eps, 1e-300) * float(d.max())
    products = A.products + C.products
    s_g = Estimate(S_g, False, bound, products)
    if not x_test.is_floating_point():
        return None, s_g
    P = ntk_operator(model, perturb(x_test, noise_std, seed), x_train, **options)
    f_pe = (P @ alpha.to(P.dtype)).double()
    p = torch.softmax(f_te, dim=1)
    ce = float(-(p * torch.log_softmax(f_pe, dim=1)).sum(dim=1).mean())
    s_e = Estimate(
        -ce, False, 2 * res * float(torch.linalg.vector_norm(f_pe)), products + P.products
    )
    return s_e, s_g


# compute_metrics(path="auto") takes the operator from this many samples on: a float64 Θ
# of 16,384² samples is 2 GiB and its eigendecomposition takes minutes, while the
# operator's memory is one chunk's graph and the Lanczos products' columns.
OPERATOR_MIN_N = 16384
# what the operator path computes (ncn/cond need λmin, which Lanczos from the top does not
# give reliably; vintk and lga_t their own kernels): the dense path for the others
OPERATOR_METRICS = ("fnorm", "mean", "lga", "trainability", "expressivity",
                    "generalization", "num_params")  # fmt: skip


def metrics(model, x, y, wanted: list[str], *, engine: dict, x_test=None, y_test=None,
            num_classes: int | None = None, noise_std: float = 1e-2, seed: int = 0,
            jitter: float = 1e-6) -> dict[str, float]:  # fmt: skip
    """:func:`fastntk.metrics.compute_metrics` on the operator (``path="operator"``): the
    metrics' values (each an :class:`Estimate`'s; call this module's functions for the
    bounds and product counts)."""
    from fastntk.engine import ntk_diag, ntk_operator
    from fastntk.metrics.ntkscore import resolve_classes

    other = [m for m in wanted if m not in OPERATOR_METRICS]
    if other:
        raise InputError(
            f"the operator path computes {', '.join(OPERATOR_METRICS)}; {', '.join(other)} "
            "need(s) the dense kernel: compute_metrics(..., path='dense')"
        )
    out: dict[str, float] = {}
    A = d = None

    def op():
        nonlocal A, d
        if A is None:
            A = ntk_operator(model, x, **engine)
            d = ntk_diag(model, x, **engine)
        return A, d

    for m in wanted:
        if m == "num_params":
            out[m] = float(sum(p.numel() for p in model.parameters()))
        elif m == "fnorm":
            out[m] = frobenius(op()[0], seed=seed).value
        elif m == "mean":
            A_, _ = op()
            ones = torch.ones(A_.shape[1], dtype=A_.dtype)
            out[m] = float((A_ @ ones).double().sum()) / (A_.shape[0] * A_.shape[1])
        elif m == "lga":
            out[m] = lga(op()[0], y, seed=seed).value
        elif m == "trainability":
            A_, d_ = op()
            out[m] = trainability(A_, d_, seed=seed).value
        elif m in ("expressivity", "generalization") and m not in out:
            if x_test is None:
                cut = x.shape[0] - x.shape[0] // 2
                xt, yt, xs, ys = x[:cut], y[:cut], x[cut:], y[cut:]
            else:
                xt, yt, xs, ys = x, y, x_test, y_test
            k = resolve_classes(num_classes, torch.as_tensor(yt), torch.as_tensor(ys))
            s_e, s_g = regression_scores(model, xt, yt, xs, ys, num_classes=k,
                                         noise_std=noise_std, seed=seed, jitter=jitter,
                                         **engine)  # fmt: skip
            if s_e is not None:
                out["expressivity"] = s_e.value
            out["generalization"] = s_g.value
    return {m: out[m] for m in wanted}
