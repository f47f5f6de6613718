"""Scoring a search space's architectures: the NAS defaults and the one scorer behind them.

:func:`space_scorer` builds the :class:`~fastntk.search.scorer.Scorer` that
``fastntk score``, ``search`` and ``evaluate`` use, and that the evidence scripts in
``bench/`` use, so a score in a journal, a benchmark table and a search is the same number:

* data: ``fastntk.data.load(data, batch_size, seed=seed)``; ``lga_t`` trains on the next
  ``lga_train`` images of the same permutation (disjoint from the scored batch);
* weights: ``torch.manual_seed(arch_seed(seed, encoding))`` before the network is built
  (pruning's supernets all take the full supernet's weights, as TE-NAS does);
* metrics: :func:`fastntk.metrics.compute_metrics` with ``errors="nan"`` (an undefined
  metric ranks last) under the NAS preset :data:`fastntk.metrics.NAS` unless told
  otherwise.

The settings the scorer carries (its journal key) name every one of these choices.

:func:`notes` reads the measured evidence (``fastntk/data/nas_evidence.json``, written by
``bench/nb201_space.py``) and says when a metric is scored in a BatchNorm mode where it
does not predict accuracy on NAS-Bench-201.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from fastntk import metrics as M
from fastntk._args import integer
from fastntk.errors import OptionError
from fastntk.search.scorer import Scorer

__all__ = ["arch_seed", "default_dtype", "evidence", "notes", "space_scorer"]

# The spectral metrics' condition numbers in eval-mode kernels exceed what float32 resolves
# (1/(N·eps32) = 1.3e5 at N=64): 82 of 200 NB201 networks had ncn = -inf in float32 and 6
# in float64 (bench/results/nb201_metric_correlation{,_f64}.md). Per-sample BatchNorm keeps
# them far below that bound (bench/results/nb201_space.md: the ncn column), so float32
# serves there.
_SPECTRAL = ("ncn", "cond", "vintk")


def arch_seed(seed: int, encoding: str) -> int:
    """The seed of an architecture's initial weights: crc32 of ``"seed:encoding"``."""
    return zlib.crc32(f"{seed}:{encoding}".encode())


def default_dtype(metrics: Sequence[str], bn: str) -> str:
    """The kernels' dtype when none is given: float64 for spectral metrics of eval-mode
    kernels (float32 cannot resolve their condition numbers), else the preset's float32."""
    if bn == "eval" and any(m in _SPECTRAL for m in metrics):
        return "float64"
    return "float32"


def space_scorer(
    space: Any,
    metrics: str | Sequence[str] | None = None,
    *,
    data: str = "cifar10",
    batch_size: int = 64,
    bn: str | None = None,
    seed: int = 0,
    dtype: str | None = None,
    num_classes: int = 10,
    lga_epochs: int = 1,
    lga_train: int = 512,
    lga_batch: int = 64,
    supernet_weights: bool = False,
) -> Scorer:
    """A scorer of ``space``'s architectures on ``batch_size`` images of ``data``.

    Args:
        space: a search space (``fastntk.spaces.registry.get_space(name)``).
        metrics: metric names or groups (default :data:`fastntk.metrics.NAS_METRICS`).
        bn: BatchNorm mode of the kernels (default the preset's, ``NAS["bn"]``).
        dtype: ``"float32"`` or ``"float64"`` (default :func:`default_dtype`).
        lga_epochs, lga_train, lga_batch: ``lga_t``'s epochs, number of training images and
            minibatch size. The paper trains on CIFAR-10's 50,000 images in batches of 1,024
            (49 steps an epoch); on the bundled 1,000-image sample the default, 512 images
            in batches of 64, gives 8 steps an epoch.
        supernet_weights: key the journal for pruning (TE-NAS's shared supernet weights).

    Returns:
        a :class:`Scorer` whose ``settings`` name data, batch, BN mode, seed, dtype and the
        initialisation (the journal's key).
    """
    names = M.expand_metrics(M.NAS_METRICS if metrics is None else metrics)
    bn = M.NAS["bn"] if bn is None else bn
    if bn not in M.BN_MODES:
        raise OptionError(f"bn must be one of {M.BN_MODES}, got {bn!r}")
    featured = [m for m in names if M.METRICS[m].kind == "features"]
    if featured and not hasattr(space, "feature_blocks"):
        hint = ("; name metrics without them (e.g. lga,num_params)" if metrics is None
                else "")  # fmt: skip
        raise OptionError(
            f"{', '.join(featured)} needs the space's feature_blocks(model), which the "
            f"{getattr(space, 'name', type(space).__name__)} space does not define{hint}"
        )
    dtype = default_dtype(names, bn) if dtype is None else dtype
    if dtype not in ("float32", "float64"):
        raise OptionError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    batch_size = integer(batch_size, "batch_size", 1)
    settings: dict[str, Any] = {
        "metrics": names, "data": data, "batch_size": batch_size, "bn": bn, "seed": seed,
        "num_classes": num_classes, "init": "torch.manual_seed(crc32('seed:arch'))",
    }  # fmt: skip
    if dtype != "float32":  # (the preset's float32 stays out of the key: it names a change)
        settings["dtype"] = dtype
    if "lga_t" in names:
        lga_epochs = integer(lga_epochs, "lga_epochs", 0)
        lga_train = integer(lga_train, "lga_train", 1)
        lga_batch = integer(lga_batch, "lga_batch", 1)
        settings["lga_t"] = {
            "epochs": lga_epochs,
            "train_images": lga_train,
            "batch": lga_batch,
            "recipe": "SGD lr 0.025 m 0.9 wd 3e-4",
        }
    if supernet_weights and hasattr(space, "full_supernet"):
        settings["supernet"] = "mean, shared weights"  # TE-NAS's: the live ops' mean, the
        # full supernet's weights (a key apart from the summed, separately seeded ones)
    return Scorer(
        _ScoreFn(space, names, data, batch_size, bn, seed, dtype, num_classes,
                 (lga_epochs, lga_train, lga_batch)),
        names,
        M.DIRECTIONS,
        settings=settings,
    )  # fmt: skip


class _ScoreFn:
    """``fn(arch) -> {metric: value}`` of :func:`space_scorer` (the data loaded once)."""

    def __init__(self, space, names, data, batch_size, bn, seed, dtype, num_classes, lga):
        from fastntk.data import load

        self.space, self.names, self.bn, self.seed = space, names, bn, seed
        self.dtype, self.num_classes = dtype, num_classes
        self.x, self.y = load(data, batch_size, seed=seed)
        self.lga: dict[str, Any] = {}
        if "lga_t" in names:  # trained on the images after the scored batch (same permutation)
            epochs, n_train, batch = lga
            tx, ty = load(data, n_train, seed=seed, offset=batch_size)
            self.lga = {"lga_epochs": epochs, "train_x": tx, "train_y": ty,
                        "train_batch_size": batch}  # fmt: skip
        self._full_state = None  # the full supernet's weights, made once

    def _is_supernet(self, enc: str) -> bool:
        from fastntk.spaces import nb201

        return hasattr(self.space, "full_supernet") and nb201.SUPER_SEP in enc

    def __call__(self, arch: Any) -> dict[str, float]:
        import torch

        enc = self.space.encode(arch)
        torch.manual_seed(arch_seed(self.seed, enc))
        model = self.space.build(arch, num_classes=self.num_classes)
        if self._is_supernet(enc):
            # TE-NAS scores every pruned supernet with the original supernet's weights
            # (one initialisation; the candidates differ only in the ops they lack)
            if self._full_state is None:
                top = self.space.full_supernet()
                torch.manual_seed(arch_seed(self.seed, top))
                self._full_state = self.space.build(top, num_classes=self.num_classes).state_dict()
            missing, _ = model.load_state_dict(self._full_state, strict=False)
            if missing:
                raise RuntimeError(f"supernet {enc} has weights the full supernet lacks: {missing}")
        blocks = {}
        if any(M.METRICS[m].kind == "features" for m in self.names):
            mods, channel_dim = self.space.feature_blocks(model)  # (space_scorer checked it)
            blocks = {"blocks": mods, "channel_dim": channel_dim}
        return M.compute_metrics(
            model,
            self.x,
            self.y,
            self.names,
            bn=self.bn,
            errors="nan",
            dtype=getattr(torch, self.dtype),
            progress=False,
            **self.lga,
            **blocks,
        )


# --------------------------------------------------------------------------------------
# evidence: what each metric predicts in each BatchNorm mode
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def evidence() -> dict[str, Any]:
    """The measured rank correlations behind the NAS defaults (``nas_evidence.json``).

    ``evidence()["tau"][bn][metric]`` is Kendall's τ of the metric, oriented by its
    direction (positive: it predicts accuracy), against NAS-Bench-201 CIFAR-10 accuracy;
    ``["n"][bn]`` the number of architectures; ``["source"]`` the table and command.
    """
    with resources.files("fastntk").joinpath("data/nas_evidence.json").open("r") as f:
        return json.load(f)


# τ below this is no signal worth scoring by (the parameter count alone: τ +0.642 over the
# whole space; bench/results/nb201_space.md)
_WEAK = 0.1


def notes(metrics: Sequence[str], bn: str) -> list[str]:
    """One line for each metric whose measured τ in BatchNorm mode ``bn`` is negative
    (it ranks architectures backwards) or below 0.1, with the mode that measured best."""
    ev = evidence()
    taus = ev["tau"].get(bn, {})
    out = []
    for m in metrics:
        t = taus.get(m)
        if t is None or t >= _WEAK:
            continue
        best = max(ev["tau"], key=lambda b: ev["tau"][b].get(m, -2.0))
        what = "anti-correlates with" if t < 0 else "barely correlates with"
        line = (f"{m} with bn={bn} {what} NAS-Bench-201 CIFAR-10 accuracy (Kendall τ "
                f"{t:+.3f} over {ev['n'][bn]} architectures, {ev['source']})")  # fmt: skip
        if best != bn:
            line += f"; bn={best} measured τ {ev['tau'][best][m]:+.3f}"
        out.append(line)
    return out
