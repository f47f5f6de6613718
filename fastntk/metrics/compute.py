"""compute_metrics: several metrics of one model, each kernel computed once.

Three steps: the options and labels are checked; the kernels that the requested metrics
need are computed (:class:`_Kernels`: Θ(x, x) and the kernel regression's blocks, in as few
engine calls as the BatchNorm mode allows); then each metric is evaluated from them by its
kind (:class:`~fastntk.metrics.MetricSpec`).

``errors="nan"`` records what cannot be computed as NaN at three levels: a kernel that
cannot be computed makes every metric NaN; an unusable input of the regression (its
labels, the split, the test batch; S_e's perturbed batch) only the metrics that use it; a
metric that raises, only itself. Bad options and labels that a metric needs raise either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from fastntk import _args
from fastntk.errors import InputError, NonFiniteKernelError, OptionError
from fastntk.metrics import operator
from fastntk.metrics.checks import check_batch, check_labels, check_rtol, check_singular
from fastntk.metrics.evolution import kernel_evolution
from fastntk.metrics.features import feature_metrics
from fastntk.metrics.model_kernels import joint_kernels, kernel_of, ntk_kwargs
from fastntk.metrics.ntkscore import perturb, regression_scores, resolve_classes
from fastntk.metrics.registry import METRICS, check_errors, expand_metrics
from fastntk.metrics.vi_ntk import vintk

__all__ = ["compute_metrics"]

# The metrics computed by kernel regression: S_e and S_g.
_REGRESSION = tuple(m for m, spec in METRICS.items() if spec.kind == "ntk_score")


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
    path: str = "auto",
    blocks: Sequence[nn.Module | str] | None = None,
    channel_dim: int = 1,
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
    * ``feature_entropy`` is AZ-NAS's expressivity of the outputs of ``blocks`` (modules
      or names; ``channel_dim`` their channel dimension), one forward in BatchNorm mode
      ``bn``: :func:`~fastntk.metrics.feature_entropy`; ``block_trainability`` its
      trainability, a forward and a backward per block in the same mode, the cotangents
      seeded with ``seed``: :func:`~fastntk.metrics.block_trainability`. The search
      spaces give their blocks (``space.feature_blocks(model)``).

    Args:
        model: the network (not changed).
        x: (N, ...) batch; y: (N,) labels (needed by lga, expressivity, generalization).
        names: metric names (or a comma-separated string); see :data:`~fastntk.metrics.METRICS`.
        errors: ``"raise"`` (default) or ``"nan"``: a metric whose computation raises a
            fastntk :class:`InputError` or :class:`NonFiniteKernelError` (a kernel that
            overflows, an architecture whose labels or kernel do not allow it) is
            recorded as ``float("nan")`` instead; a search then ranks it last. The
            metrics that need no kernel (num_params, the block features) are computed
            even when a kernel cannot be.
        progress: the engine's progress bar (:func:`fastntk.ntk`'s ``progress``).
        path: ``"dense"`` (the kernel Θ), ``"operator"`` (products Θ v and the exact
            diagonal, no N×N matrix: :mod:`fastntk.metrics.operator`; fnorm, mean, lga,
            trainability, expressivity, generalization, num_params, the estimated ones
            with their stated bounds there) or ``"auto"`` (the operator from
            ``operator.OPERATOR_MIN_N`` samples on).

    Returns:
        ``{name: value}`` in the order requested (groups expanded).
    """
    wanted = expand_metrics(names)
    check_errors(errors)
    lga_epochs = _args.integer(lga_epochs, "lga_epochs", 0)
    train_batch_size = _args.integer(train_batch_size, "train_batch_size", 1)
    noise_std = _args.real(noise_std, "noise_std")
    jitter = _args.real(jitter, "jitter")
    check_rtol(rtol)
    check_singular(singular)
    x = check_batch(x, "x")
    featured = [m for m in wanted if METRICS[m].kind == "features"]
    if featured and blocks is None:
        raise OptionError(
            f"{', '.join(featured)} needs blocks=: the submodules whose outputs it measures "
            "(a search space gives them: space.feature_blocks(model))"
        )
    if path not in ("auto", "dense", "operator"):
        raise OptionError(f"path must be 'auto', 'dense' or 'operator', not {path!r}")
    kw = {**ntk_kwargs(bn, params, output, dtype, chunk_size), "progress": progress}
    yt = _labels(wanted, y, x.shape[0])

    feature_values: dict[str, float] = {}
    joint_failed = False  # (then each feature metric is computed on its own)
    fkw = dict(channel_dim=channel_dim, bn=bn, dtype=dtype, seed=seed)

    def value_of_features(m: str) -> float:
        nonlocal joint_failed
        if not feature_values and not joint_failed and len(featured) > 1:
            try:  # one forward for all of them
                feature_values.update(feature_metrics(model, x, blocks, featured, **fkw))
            except (InputError, NonFiniteKernelError):
                joint_failed = True  # (one failed: each alone, so the other keeps its value)
        if m in feature_values:
            return feature_values[m]
        return feature_metrics(model, x, blocks, [m], **fkw)[m]

    if path == "operator" or (path == "auto" and x.shape[0] >= operator.OPERATOR_MIN_N):
        engine = dict(bn=bn, params=params, output=output, dtype=dtype, chunk_size=chunk_size)
        kernel_metrics = [m for m in wanted if m not in featured]
        try:  # (feature metrics need no kernel: computed below as on the dense path)
            out = operator.metrics(model, x, yt, kernel_metrics, engine=engine, x_test=x_test,
                                   y_test=y_test, num_classes=num_classes,
                                   noise_std=noise_std, seed=seed, jitter=jitter)  # fmt: skip
        except (InputError, NonFiniteKernelError):
            if errors == "raise":
                raise
            out = dict.fromkeys(kernel_metrics, math.nan)
        for m in featured:
            out[m] = _or_nan(errors, value_of_features, m)
        return {m: out[m] for m in wanted}
    test = _TestBatch(x_test, y_test, num_classes, noise_std, seed, jitter)
    kernels: _Kernels | None = None
    try:
        kernels = _Kernels(model, x, yt, wanted, kw, test, errors)
    except (InputError, NonFiniteKernelError):
        if errors == "raise":
            raise  # (else the metrics that need no kernel are still computed, below)

    engine = dict(bn=bn, params=params, output=output, dtype=dtype, chunk_size=chunk_size)
    opts = {"rtol": rtol, "singular": singular}
    value_of: dict[str, Callable[[str], Any]] = {  # by kind: metric name -> its value
        "kernel": lambda m: METRICS[m].fn(kernels.K, yt, opts),
        "ntk_score": lambda m: kernels.regression.score(m),
        "model": lambda m: sum(p.numel() for p in model.parameters()),
        "features": value_of_features,
        "evolution": lambda m: kernel_evolution(
            model, x, yt, times=(lga_epochs,), train_x=train_x, train_y=train_y,
            batch_size=train_batch_size, seed=seed, **engine,
        ).lga[-1],
        "vintk": lambda m: vintk(
            model, x, kernel=kernels.K, cutoff=cutoff, beta=beta, rtol=rtol,
            singular=singular, progress=progress, **engine,
        ),
    }  # fmt: skip
    out: dict[str, float] = {}
    undefined = kernels.undefined if kernels else _needs_kernel(wanted)
    for m in wanted:
        if m in undefined:
            out[m] = math.nan
            continue
        out[m] = _or_nan(errors, value_of[METRICS[m].kind], m)
    return out


def _needs_kernel(wanted: list[str]) -> list[str]:
    """The metrics of ``wanted`` that need one of the call's kernels (all but the parameter
    count and the block features)."""
    return [m for m in wanted if METRICS[m].kind not in ("model", "features")]


def _or_nan(errors: str, fn: Callable[..., Any], *args: Any) -> float:
    """``float(fn(*args))``; under errors="nan" an :class:`InputError` or
    :class:`NonFiniteKernelError` gives NaN."""
    try:
        return float(fn(*args))
    except (InputError, NonFiniteKernelError):
        if errors == "raise":
            raise
        return math.nan


def _labels(wanted: list[str], y: Any, n: int) -> torch.Tensor | None:
    """``y`` as (N,) int64 labels if a requested metric needs them (:class:`InputError` if
    they are missing), else None."""
    need = [m for m in wanted if METRICS[m].needs_labels]
    if not need:
        return None
    if y is None:
        raise InputError(f"metrics {need} need labels y")
    return check_labels(y, n, "y")


class _TestBatch(NamedTuple):
    """The kernel regression's options: its test batch (None: split x), the number of
    classes, and S_e's noise, seed and the solve's jitter."""

    x_test: torch.Tensor | None
    y_test: Any
    num_classes: int | None
    noise_std: float
    seed: int
    jitter: float


@dataclass
class _Regression:
    """S_e and S_g's inputs: kernel blocks of one engine call, and their labels."""

    K_tr: torch.Tensor  # Θ(train, train), (n_train, n_train)
    K_te: torch.Tensor  # Θ(test, train), (n_test, n_train)
    K_pe: torch.Tensor | None  # Θ(test', train), (n_test, n_train); None without S_e
    y_train: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    jitter: float
    _scores: tuple[float | None, float] | None = field(default=None, repr=False)

    def score(self, name: str) -> float:
        """S_e (``"expressivity"``) or S_g (``"generalization"``), one regression for both."""
        if self._scores is None:
            self._scores = regression_scores(
                self.K_tr,
                self.K_te,
                self.K_pe,
                self.y_train,
                self.y_test,
                self.num_classes,
                self.jitter,
            )
        value = self._scores[0] if name == "expressivity" else self._scores[1]
        assert value is not None  # (S_e is requested only with its perturbed kernel)
        return value


class _Kernels:
    """The kernels of one :func:`compute_metrics` call, each computed once.

    Attributes:
        K: Θ(x, x), (N, N) on the CPU; None when no requested metric uses it.
        regression: S_e and S_g's inputs; None when neither is requested, or undefined.
        undefined: requested metrics whose own inputs are unusable (``errors="nan"`` only).

    An error computing a kernel propagates from the constructor.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None,
        wanted: list[str],
        kw: dict,
        test: _TestBatch,
        errors: str,
    ) -> None:
        self.K: torch.Tensor | None = None
        self.regression: _Regression | None = None
        self.undefined: set[str] = set()
        self._errors = errors
        kinds = {METRICS[m].kind for m in wanted}
        if "ntk_score" in kinds:
            assert y is not None  # (S_e and S_g need labels: checked before)
            self._regress(model, x, y, "expressivity" in wanted, kw, test)
        if self.K is None and kinds & {"kernel", "vintk"}:
            self.K = kernel_of(model, x, kw)

    def _or_undefined(self, fn: Callable[[], Any], names: Iterable[str]) -> Any:
        """``fn()``; under errors="nan" an :class:`InputError` marks ``names`` undefined and
        gives None."""
        try:
            return fn()
        except InputError:
            if self._errors == "raise":
                raise
            self.undefined.update(names)
            return None

    def _regress(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        with_s_e: bool,
        kw: dict,
        test: _TestBatch,
    ) -> None:
        """The regression's kernels, blocks of one engine call on [x; x_test; x_test']
        (see :func:`~fastntk.metrics.ntk_score`). With sample-independent BatchNorm the x
        block is Θ(x, x) itself; with ``bn="batch"`` Θ(x, x) is a call of its own."""
        batches = self._or_undefined(lambda: _test_batch(x, y, test), _REGRESSION)
        if batches is None:
            return
        x_te, y_te, y_tr = batches
        n_tr = y_tr.shape[0]
        pert: list[torch.Tensor] = []
        if with_s_e:  # only S_e needs the perturbed test batch (token ids take none)
            xe = x[n_tr:] if x_te is None else x_te
            xp = self._or_undefined(
                lambda: perturb(xe, test.noise_std, test.seed), ["expressivity"]
            )
            pert = [] if xp is None else [xp]
        if x_te is None:  # the split: blocks of one kernel of x (and x_test')
            Kx, pe = joint_kernels(model, x, pert, kw)
            K_tr, K_te = Kx[:n_tr, :n_tr], Kx[n_tr:, :n_tr]
            K_pe = pe[0][:, :n_tr] if pert else None
        else:
            Kx, (K_te, *pe) = joint_kernels(model, x, [x_te, *pert], kw)
            K_tr, K_pe = Kx, (pe[0] if pert else None)
        if kw["bn"] != "batch":
            self.K = Kx
        ncls = self._or_undefined(
            lambda: resolve_classes(test.num_classes, y_tr, y_te), _REGRESSION
        )
        if ncls is not None:
            self.regression = _Regression(K_tr, K_te, K_pe, y_tr, y_te, ncls, test.jitter)


def _test_batch(
    x: torch.Tensor, y: torch.Tensor, test: _TestBatch
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The regression's ``(x_test, y_test, y_train)``; x_test is None for the split of x
    (train = ``x[:N - N//2]``, test = the rest)."""
    if test.x_test is None:
        n = x.shape[0]
        n_te = n // 2
        if n_te < 1:
            raise InputError("expressivity/generalization need N >= 2 to split x")
        return None, y[n - n_te :], y[: n - n_te]
    xte = check_batch(test.x_test, "x_test")
    if test.y_test is None:
        raise InputError("x_test given without y_test")
    return xte, check_labels(test.y_test, xte.shape[0], "y_test"), y
