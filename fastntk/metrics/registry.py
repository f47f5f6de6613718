"""The metrics by name: what ``--metric`` and :func:`~fastntk.metrics.compute_metrics`
accept, each metric's direction for ranking, the NAS preset, and the revisions that search
journals key on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastntk.errors import OptionError
from fastntk.metrics.kernel import condition_number, fnorm, lga, mean, ncn, trainability
from fastntk.metrics.ntkscore import EXPRESSIVITY_HIGHER_IS_BETTER

__all__ = [
    "DIRECTIONS",
    "METRICS",
    "NAS",
    "NAS_METRICS",
    "REVISIONS",
    "MetricSpec",
    "check_errors",
    "expand_metrics",
]


@dataclass(frozen=True)
class MetricSpec:
    """How a metric named on the command line is computed.

    Attributes:
        name: the command-line name.
        kind: ``"kernel"`` (a function of Θ(x, x) and maybe y, shared kernel),
            ``"ntk_score"`` (needs the kernel-regression kernels), ``"vintk"``,
            ``"evolution"`` (a kernel after training:
            :func:`~fastntk.metrics.kernel_evolution`) or
            ``"model"`` (a property of the model alone: its parameter count) or
            ``"features"`` (a property of the block outputs of one forward:
            :func:`~fastntk.metrics.feature_entropy`,
            :func:`~fastntk.metrics.block_trainability`; they need the blocks).
        higher_is_better: direction for ranking / Borda.
        needs_labels: whether y is required.
        fn: for ``kind == "kernel"``: ``fn(K, y, opts) -> float``, ``K`` the (N, N)
            kernel, ``y`` the (N,) labels or None, ``opts`` ``{"rtol", "singular"}``.
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
    "feature_entropy": MetricSpec(
        "feature_entropy",
        "features",
        True,
        False,
        None,
        "AZ-NAS expressivity: entropy of the block features' spectrum (zero-cost baseline)",
    ),
    "block_trainability": MetricSpec(
        "block_trainability",
        "features",
        True,
        False,
        None,
        "AZ-NAS trainability: block Jacobians' spectral norms near 1 (zero-cost baseline)",
    ),
}

#: The NAS preset of :func:`~fastntk.metrics.compute_metrics`: ``compute_metrics(model, x,
#: y, NAS_METRICS, **NAS)`` scores an architecture the way that measured best against
#: NAS-Bench-201 accuracy (``bench/results/nb201_space.md``; ``fastntk score|search|evaluate``
#: and :data:`fastntk.adapters.MEASURES` use it). Each sample's BatchNorm uses its own
#: statistics: the papers' train-mode ranking (τ within noise of the coupled batch kernel)
#: at the cost of an eval-mode kernel, where running statistics rank LGA and F-Norm
#: backwards. The engine's own default (``fastntk.ntk``: the function as it is, ``bn="eval"``)
#: is not this.
NAS: dict[str, Any] = {"bn": "per_sample", "params": None}

#: The default NAS score: the Borda count of these metrics (see :data:`NAS`): LGA with
#: AZ-NAS's two block-feature proxies and the parameter count (the feature metrics need the
#: space's ``feature_blocks``). A search keeps the best-scored of its evaluations, so the
#: default is chosen by the top end of its ranking: among the scores with an NTK metric
#: (single metrics and the Borda counts of ``bench/nb201_space.py``; not the zero-cost
#: proxies alone), the one whose best-scored of 100 random NAS-Bench-201 architectures is
#: expected to rank highest by true accuracy, averaged over CIFAR-10, CIFAR-100 and
#: ImageNet16-120 (all 6,466 unique architectures, ``bench/results/nb201_space.md``;
#: ``tests/test_nas.py`` holds this constant to that evidence): top 6.6% on average
#: (6.8 / 7.2 / 5.8%), against 10.1% for Borda(lga, num_params), the default before, and
#: 10.9% for the parameter count alone. It also ranks the whole space best (CIFAR-10 τ
#: +0.742, ρ 0.915 / 0.893 / 0.873); beside LGA's kernel it costs one forward and a
#: backward per cell.
NAS_METRICS: tuple[str, ...] = ("lga", "feature_entropy", "block_trainability", "num_params")

# Metric groups: a name that expands to several metrics. ``nas_rank``: the score with an
# NTK metric that ranks the whole space best (CIFAR-10 τ, bench/results/nb201_space.md;
# tests/test_nas.py reads it), for ranking a set of architectures: today the default's
# metrics. (``nas_accurate``, Borda(lga_t, num_params), is gone: on the architectures
# bench/results/nb201_lga_t.md scored, the default ranks above every score with lga_t.)
_GROUPS: dict[str, tuple[str, ...]] = {
    "ntk_score": ("trainability", "expressivity", "generalization"),
    "nas_rank": ("lga", "feature_entropy", "block_trainability", "num_params"),
}

#: metric name -> higher_is_better, for :func:`~fastntk.metrics.borda` and the search layer.
DIRECTIONS: dict[str, bool] = {name: spec.higher_is_better for name, spec in METRICS.items()}

# Revisions of metric definitions whose values changed for some networks: search
# journals key on them (fastntk.search.Scorer's settings), so a score stored under another
# revision is not served as this one's. Revision 2 of S_e and S_g: NaN for a constant train
# kernel (revision 1 scored networks whose output ignores the input as the best).
REVISIONS: dict[str, int] = {"expressivity": 2, "generalization": 2}


def expand_metrics(names: Iterable[str] | str) -> list[str]:
    """Metric names from a list or a comma-separated string, groups expanded, deduplicated.

    ``"ntk_score"`` expands to ``trainability, expressivity, generalization``,
    ``"nas_rank"`` to ``lga, feature_entropy, block_trainability, num_params``. Unknown
    names raise :class:`OptionError` listing the known ones.
    """
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


def check_errors(errors: Any) -> None:
    """:func:`~fastntk.metrics.compute_metrics`'s ``errors``: ``"raise"`` or ``"nan"``."""
    if errors not in ("raise", "nan"):
        raise OptionError(f"errors must be 'raise' or 'nan', got {errors!r}")
