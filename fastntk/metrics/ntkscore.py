"""The NTK-score (SABoC-NAS paper, §4.1): trainability S_t, and expressivity S_e and
generalisation S_g by kernel regression from a train batch to a test batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastntk import _args
from fastntk.errors import InputError
from fastntk.metrics.checks import check_batch, check_labels
from fastntk.metrics.kernel import trainability
from fastntk.metrics.model_kernels import joint_kernels, kernel_of, ntk_kwargs

__all__ = [
    "EXPRESSIVITY_HIGHER_IS_BETTER",
    "ntk_score",
    "perturb",
    "regression_scores",
    "resolve_classes",
]

# The NTK-score paper's Eq. 9 defines S_e = -CrossEntropy(...) and says "the smaller
# the S_e, the stronger the expressivity", while its §5.3 says "a higher S_e indicates
# the network's enhanced ability ... leading to higher accuracy". fastntk always returns
# Eq. 9's value; the direction used by `borda`/search is this constant, settled on
# NAS-Bench-201 (python3 bench/nb201_metric_correlation.py --archs 200 --batch-size 64
# --bn eval; 200 sampled architectures at initialisation, 64 bundled CIFAR-10 images
# (train) + 64 (test), 2-core CPU, bench/results/nb201_metric_correlation.md): Kendall tau
# of S_e with CIFAR-10 accuracy is -0.351 over the 194 networks whose kernel is not
# constant, so *lower* S_e goes with higher accuracy, as Eq. 9's sentence says.
EXPRESSIVITY_HIGHER_IS_BETTER = False


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
    jitter = _args.real(jitter, "jitter")
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


def regression_scores(
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


def resolve_classes(num_classes: int | None, *ys: torch.Tensor) -> int:
    """K of the one-hot targets: ``num_classes``, or the largest label plus one if None;
    :class:`InputError` for a negative label, one out of range, or fewer than two classes."""
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


def perturb(x: torch.Tensor, noise_std: float, seed: int) -> torch.Tensor:
    """``x + noise_std · ε`` (Eq. 7), ε standard normal from a CPU generator seeded with
    ``seed``: the perturbed test batch of S_e."""
    if not x.is_floating_point():
        raise InputError(
            "expressivity (S_e) perturbs the test inputs with Gaussian noise (Eq. 7), which "
            f"{x.dtype} token ids cannot take; leave it out (e.g. names='trainability,"
            "generalization' in compute_metrics)"
        )
    g = torch.Generator(device="cpu").manual_seed(_args.integer(seed, "seed"))
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    return x + noise_std * eps


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
      :func:`~fastntk.metrics.compute_metrics`, so search ranks such a network last on them).

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
    x_train = check_batch(x_train, "x_train")
    x_test = check_batch(x_test, "x_test")
    ytr = check_labels(y_train, x_train.shape[0], "y_train")
    yte = check_labels(y_test, x_test.shape[0], "y_test")
    num_classes = resolve_classes(num_classes, ytr, yte)
    noise_std = _args.real(noise_std, "noise_std")
    jitter = _args.real(jitter, "jitter")
    kw = ntk_kwargs(bn, params, output, dtype, chunk_size)
    x_pert = perturb(x_test, noise_std, seed)
    K_tr, (K_te, K_pe) = joint_kernels(model, x_train, [x_test, x_pert], kw)
    K_st = kernel_of(model, x_train, kw) if bn == "batch" else K_tr
    S_e, S_g = regression_scores(K_tr, K_te, K_pe, ytr, yte, num_classes, jitter)
    assert S_e is not None
    return trainability(K_st, rtol=rtol), S_e, S_g
