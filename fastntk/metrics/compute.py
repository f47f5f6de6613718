"""compute_metrics: several metrics of one model, each kernel computed once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from fastntk import _args
from fastntk.errors import InputError, NonFiniteKernelError
from fastntk.metrics.checks import check_batch, check_labels, check_rtol, check_singular
from fastntk.metrics.evolution import kernel_evolution
from fastntk.metrics.model_kernels import joint_kernels, kernel_of, ntk_kwargs
from fastntk.metrics.ntkscore import perturb, regression_scores, resolve_classes
from fastntk.metrics.registry import METRICS, check_errors, expand_metrics
from fastntk.metrics.vi_ntk import vintk

__all__ = ["compute_metrics"]


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
      engine call on [x; x_test; x_test'] (see :func:`~fastntk.metrics.ntk_score`); with ``bn`` eval or
      per_sample that same call also gives Θ(x, x), so all kernel metrics plus S_e, S_g
      cost one call; with ``bn="batch"`` Θ(x, x) is a second call. ``trainability`` is
      always ``S_t(Θ(x, x))`` (use :func:`~fastntk.metrics.ntk_score` for S_t of the train batch alone).
    * ``vintk`` needs one extra kernel Θ(hp(x), hp(x)).
    * ``lga_t`` is LGA_t, the LGA paper's main metric: the LGA of Θ_t(x, x) after
      ``lga_epochs`` epochs of the paper's training recipe on ``(train_x, train_y)``
      (default: x, y) in minibatches of ``train_batch_size``, via :func:`~fastntk.metrics.kernel_evolution`
      on a copy (seeded with ``seed``; the user's model is not trained).
    * ``num_params`` is the number of parameters of the model (every parameter, whatever
      ``params`` selects): the zero-cost baseline a training-free metric must beat.

    Args:
        model: the network (not changed).
        x: (N, ...) batch; y: (N,) labels (needed by lga, expressivity, generalization).
        names: metric names (or a comma-separated string); see :data:`~fastntk.metrics.METRICS`.
        errors: ``"raise"`` (default) or ``"nan"``: a metric whose computation raises a
            fastntk :class:`InputError` or :class:`NonFiniteKernelError` (a kernel that
            overflows, an architecture whose labels or kernel do not allow it) is
            recorded as ``float("nan")`` instead; a search then ranks it last.
        progress: the engine's progress bar (:func:`fastntk.ntk`'s ``progress``).

    Returns:
        ``{name: value}`` in the order requested (groups expanded).
    """
    wanted = expand_metrics(names)
    check_errors(errors)
    lga_epochs = _args.integer(lga_epochs, "lga_epochs", 0)
    train_batch_size = _args.integer(train_batch_size, "train_batch_size", 1)
    noise_std = _args.real(noise_std, "noise_std")
    jitter = _args.real(jitter, "jitter")
    if rtol is not None:
        check_rtol(rtol)
    check_singular(singular)
    x = check_batch(x, "x")
    kw = {**ntk_kwargs(bn, params, output, dtype, chunk_size), "progress": progress}
    n = x.shape[0]
    yt = None
    if any(METRICS[m].needs_labels for m in wanted):
        if y is None:
            need = [m for m in wanted if METRICS[m].needs_labels]
            raise InputError(f"metrics {need} need labels y")
        yt = check_labels(y, n, "y")
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
                xte = check_batch(x_test, "x_test")
                if y_test is None:
                    raise InputError("x_test given without y_test")
                return xte, check_labels(y_test, xte.shape[0], "y_test"), yt

            got = _or_undefined(_batches, regression)
            if got is not None:
                xte, yte, ytr = got
                pert: list[torch.Tensor] = []
                if need_e:  # only S_e needs the perturbed test batch (token ids take none)
                    xe = x[ytr.shape[0] :] if xte is None else xte
                    xp = _or_undefined(lambda: perturb(xe, noise_std, seed), ["expressivity"])
                    pert = [] if xp is None else [xp]
                if xte is None:  # the split: blocks of one kernel of x (and x_test')
                    n_tr = ytr.shape[0]
                    Kx, pe = joint_kernels(model, x, pert, kw)
                    K_tr, K_te = Kx[:n_tr, :n_tr], Kx[n_tr:, :n_tr]
                    K_pe = pe[0][:, :n_tr] if pert else None
                else:
                    Kx, (K_te, *pe) = joint_kernels(model, x, [xte, *pert], kw)
                    K_tr, K_pe = Kx, (pe[0] if pert else None)
                if bn != "batch":
                    K = Kx  # sample-independent BN: the x block IS Θ(x, x)
                ncls = _or_undefined(lambda: resolve_classes(num_classes, ytr, yte), regression)
                if ncls is not None:

                    def _reg() -> tuple[float | None, float]:
                        return regression_scores(K_tr, K_te, K_pe, ytr, yte, ncls, jitter)

                    reg = _reg
        if need_K and K is None:
            K = kernel_of(model, x, kw)
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
