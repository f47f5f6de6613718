"""The bundled NAS-Bench-201 ground truth: 200-epoch test accuracies of the 15,625 archs.

``fastntk/data/nb201_accuracy.csv.gz`` (see ``fastntk/data/PROVENANCE.md``) holds, in
benchmark index order, each arch string, its ``UniqueString`` and its test accuracy
on CIFAR-10, CIFAR-100 and ImageNet16-120 (means of three seeds). It is read lazily,
on the first call of a function that needs it, and once.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

import numpy as np

from fastntk.errors import OptionError
from fastntk.spaces.nb201.grammar import NUM_ARCHS, ArchLike, as_arch

__all__ = [
    "DATASETS",
    "NB201Table",
    "accuracy",
    "all_archs",
    "load_table",
    "percentile",
    "percentiles",
    "rank",
]

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "imagenet16-120")
"""Dataset names accepted by :func:`accuracy`, :func:`rank` and :func:`percentile`."""

_COLUMNS = {
    "cifar10": "CIFAR10TestAccuracy200Epochs",
    "cifar100": "CIFAR100TestAccuracy200Epochs",
    "imagenet16-120": "ImageNetTestAccuracy200Epochs",
}
_DATASET_ALIASES = {
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "imagenet16-120": "imagenet16-120",
    "imagenet16_120": "imagenet16-120",
    "imagenet": "imagenet16-120",
    "imagenet16": "imagenet16-120",
}

_TABLE_FILE = "nb201_accuracy.csv.gz"


@dataclass(frozen=True)
class NB201Table:
    """The bundled NAS-Bench-201 table (benchmark index order).

    Attributes:
        archs: the 15,625 arch strings.
        unique: the ``UniqueString`` of each arch.
        acc: dataset name -> float64 array of 200-epoch test accuracies (%), shape (15625,).
        index: arch string -> row index.
    """

    archs: tuple[str, ...]
    unique: tuple[str, ...]
    acc: dict[str, np.ndarray]
    index: dict[str, int]

    def __len__(self) -> int:
        return len(self.archs)

    def record(self, arch: ArchLike) -> dict[str, object]:
        """One row as a dict: arch, unique, and one accuracy per dataset."""
        i = self.index[as_arch(arch)]
        rec: dict[str, object] = {"index": i, "arch": self.archs[i], "unique": self.unique[i]}
        for d in DATASETS:
            rec[d] = float(self.acc[d][i])
        return rec


@functools.lru_cache(maxsize=1)
def load_table() -> NB201Table:
    """Read the bundled ``nb201_accuracy.csv.gz`` once (cached) into an :class:`NB201Table`."""
    raw = resources.files("fastntk").joinpath("data/" + _TABLE_FILE).read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    reader = csv.DictReader(io.StringIO(text))
    archs: list[str] = []
    uniq: list[str] = []
    cols: dict[str, list[float]] = {d: [] for d in DATASETS}
    for row in reader:
        archs.append(row["ArchitectureString"])
        uniq.append(row["UniqueString"])
        for d, c in _COLUMNS.items():
            # rounded to 1e-6 (%): the table's means of three seeds carry float noise
            # (61.99333333333333 and ...34), which split ties in rank() and percentile();
            # one test image of 10,000 (6,000) is 1e-2 % (1.7e-2 %), a third of that in a
            # mean of three seeds: real differences are far above the rounding
            cols[d].append(round(float(row[c]), 6))
    if len(archs) != NUM_ARCHS or len(set(archs)) != NUM_ARCHS:
        raise RuntimeError(f"corrupt {_TABLE_FILE}: {len(archs)} rows, expected {NUM_ARCHS}")
    acc = {}
    for d in DATASETS:
        a = np.asarray(cols[d], dtype=np.float64)
        a.setflags(write=False)
        acc[d] = a
    return NB201Table(
        archs=tuple(archs),
        unique=tuple(uniq),
        acc=acc,
        index={a: i for i, a in enumerate(archs)},
    )


def all_archs() -> list[str]:
    """All 15,625 arch strings in NAS-Bench-201 benchmark index order.

    The benchmark order is not an enumeration order (index 0 is
    ``|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|...``),
    so it is read from the bundled table. Returns a new list each call.
    """
    return list(load_table().archs)


def _dataset(dataset: str) -> str:
    key = _DATASET_ALIASES.get(dataset.lower()) if isinstance(dataset, str) else None
    if key is None:
        raise OptionError(f"unknown NB201 dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return key


@functools.lru_cache(maxsize=len(DATASETS))
def _sorted_acc(dataset: str) -> np.ndarray:
    return np.sort(load_table().acc[dataset])


def accuracy(arch: ArchLike, dataset: str = "cifar10") -> float:
    """200-epoch test accuracy (%) of ``arch`` on ``dataset`` (see :data:`DATASETS`)."""
    d = _dataset(dataset)
    t = load_table()
    return float(t.acc[d][t.index[as_arch(arch)]])


def rank(arch: ArchLike, dataset: str = "cifar10") -> int:
    """Rank of ``arch`` on ``dataset``: 1 = best; ties share a rank (1 + #strictly better)."""
    d = _dataset(dataset)
    a = accuracy(arch, d)
    s = _sorted_acc(d)
    better = len(s) - int(np.searchsorted(s, a, side="right"))
    return better + 1


def percentile(arch: ArchLike, dataset: str = "cifar10") -> float:
    """Percentage (0-100) of the 15,625 archs strictly worse than ``arch`` on ``dataset``."""
    return float(percentiles([arch], dataset)[0])


def accuracies(archs: Iterable[ArchLike], dataset: str = "cifar10") -> np.ndarray:
    """:func:`accuracy` of each of ``archs``, as one array, in their order."""
    t = load_table()
    return t.acc[_dataset(dataset)][[t.index[as_arch(a)] for a in archs]]


def percentiles(archs: Iterable[ArchLike], dataset: str = "cifar10") -> np.ndarray:
    """:func:`percentile` of each of ``archs``, as one array (one sorted look-up for all)."""
    d = _dataset(dataset)
    acc = accuracies(archs, d)
    s = _sorted_acc(d)
    return 100.0 * np.searchsorted(s, acc, side="left") / len(s)
