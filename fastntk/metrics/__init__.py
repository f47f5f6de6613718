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
  :func:`ntk_score`, :func:`vintk`, :func:`kernel_evolution`; and two zero-cost proxies
  beside them, AZ-NAS's, that need a forward (and a backward per block) only:
  :func:`feature_entropy` and :func:`block_trainability`.

The modules, by family:

* :mod:`~fastntk.metrics.kernel`: the kernel-level metrics and their numerical conventions
  (eigenvalue clamping, singular kernels, NaN and Inf);
* :mod:`~fastntk.metrics.sketch`: the same metrics of a sketched kernel;
* :mod:`~fastntk.metrics.ntkscore`: the NTK-score (S_t, S_e, S_g) by kernel regression;
* :mod:`~fastntk.metrics.vi_ntk`: fastntk's ViNTK (the kernel of the high-passed input);
* :mod:`~fastntk.metrics.evolution`: kernels of a copy of the model while it trains;
* :mod:`~fastntk.metrics.features`: AZ-NAS's expressivity and trainability of blocks (no kernel);
* :mod:`~fastntk.metrics.ranking`: Borda counts, the one ranking rule the search uses too;
* :mod:`~fastntk.metrics.registry`: the metrics by name, their directions, the NAS preset;
* :mod:`~fastntk.metrics.compute`: :func:`compute_metrics`, each kernel computed once;
* :mod:`~fastntk.metrics.checks` and :mod:`~fastntk.metrics.model_kernels`: the input
  checks and the engine calls they share.

The names below are imported on first use (PEP 562), as :mod:`fastntk`'s: the search
layer, which runs without torch, imports :mod:`~fastntk.metrics.ranking` through this
package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_MODULES = {
    "compute": ("compute_metrics",),
    "evolution": ("KernelEvolution", "kernel_evolution"),
    "features": ("FEATURE_METRICS", "block_entropies", "block_trainability", "feature_entropy",
                 "feature_metrics"),
    "kernel": ("condition_number", "fnorm", "kernel_correlation", "label_matrix", "lga",
               "mean", "ncn", "relative_kernel_difference", "spectrum", "trainability"),
    "model_kernels": ("BN_MODES",),
    "ntkscore": ("EXPRESSIVITY_HIGHER_IS_BETTER", "ntk_score"),
    "ranking": ("borda",),
    "registry": ("DIRECTIONS", "METRICS", "NAS", "NAS_METRICS", "REVISIONS", "MetricSpec",
                 "expand_metrics"),
    "sketch": ("sketch_metrics",),
    "vi_ntk": ("highpass", "vintk", "vintk_kernel"),
}  # fmt: skip
_LAZY = {name: module for module, names in _MODULES.items() for name in names}

if TYPE_CHECKING:
    from fastntk.metrics.compute import compute_metrics
    from fastntk.metrics.evolution import KernelEvolution, kernel_evolution
    from fastntk.metrics.features import (
        FEATURE_METRICS,
        block_entropies,
        block_trainability,
        feature_entropy,
        feature_metrics,
    )
    from fastntk.metrics.kernel import (
        condition_number,
        fnorm,
        kernel_correlation,
        label_matrix,
        lga,
        mean,
        ncn,
        relative_kernel_difference,
        spectrum,
        trainability,
    )
    from fastntk.metrics.model_kernels import BN_MODES
    from fastntk.metrics.ntkscore import EXPRESSIVITY_HIGHER_IS_BETTER, ntk_score
    from fastntk.metrics.ranking import borda
    from fastntk.metrics.registry import (
        DIRECTIONS,
        METRICS,
        NAS,
        NAS_METRICS,
        REVISIONS,
        MetricSpec,
        expand_metrics,
    )
    from fastntk.metrics.sketch import sketch_metrics
    from fastntk.metrics.vi_ntk import highpass, vintk, vintk_kernel


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fastntk.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fastntk.metrics.{_LAZY[name]}"), name)
    globals()[name] = value  # (once: later lookups do not come here)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DIRECTIONS",
    "EXPRESSIVITY_HIGHER_IS_BETTER",
    "FEATURE_METRICS",
    "BN_MODES",
    "METRICS",
    "NAS",
    "NAS_METRICS",
    "REVISIONS",
    "KernelEvolution",
    "MetricSpec",
    "block_entropies",
    "block_trainability",
    "borda",
    "compute_metrics",
    "condition_number",
    "expand_metrics",
    "feature_entropy",
    "feature_metrics",
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
