"""Rank aggregation: the Borda count that orders architectures by several metrics at once.

:func:`borda` takes a table (architectures × metrics), :func:`borda_scores` the search's
``{metric: value}`` dicts (it is :func:`fastntk.search.borda_scores`, and so the search's
fitness over several metrics); :class:`RunningBorda` keeps the count of a growing set (a
search's history, among which it ranks its candidates). All rank by :func:`ranks`: ties
share the mean of the ranks they span, so a total does not depend on the order of the
input, and NaN (an undefined metric) ranks below every number, ``-inf`` included, tied
with the other NaNs.

The search layer imports this module and runs without torch: it imports neither torch nor
the rest of :mod:`fastntk.metrics`, and numpy only when :func:`borda` is called.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastntk.errors import InputError, InputTypeError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["RunningBorda", "borda", "borda_scores", "ranks"]


def ranks(values: Sequence[Any], higher_is_better: bool) -> list[float]:
    """Rank of each value within ``values``, 0 = worst .. n-1 = best.

    Ties get the mean of the ranks they span (halves); NaN is worst, below the worst
    number (``-inf``, or ``+inf`` when lower is better), tied with the other NaNs.

    Args:
        values: (n,) numbers (anything ``float()`` takes).
        higher_is_better: False ranks the smallest value best.

    Returns:
        (n,) ranks as Python floats.
    """
    keyed = sorted((_key(v, higher_is_better), i) for i, v in enumerate(values))
    n = len(keyed)
    out = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and keyed[j + 1][0] == keyed[i][0]:
            j += 1
        for t in range(i, j + 1):
            out[keyed[t][1]] = (i + j) / 2.0
        i = j + 1
    return out


def _key(value: Any, higher_is_better: bool) -> tuple[int, float]:
    """The sort key of a value: NaN first (worst), then the values oriented so that
    larger is better."""
    v = float(value)
    return (0, 0.0) if math.isnan(v) else (1, v if higher_is_better else -v)


class RunningBorda:
    """The Borda count of an entry within a growing set: :func:`borda_scores` of the whole
    set, read off for one entry, without ranking the set again.

    One sorted list of keys per metric; an entry's rank in a metric is read with two
    bisections: (#worse + #worse-or-tied - 1) / 2, the mean of the ranks its tie spans,
    as :func:`ranks` gives it. A lookup costs O(k log n) and an addition an insertion
    into k lists, where :func:`borda_scores` sorts the whole set on every call: a search
    that ranks its candidates among every evaluation so far stays linear in its length.

    Args:
        directions: ``metric -> higher_is_better``: the metrics that count.
    """

    def __init__(self, directions: Mapping[str, bool]):
        self.directions = dict(directions)
        self._keys: dict[str, list[tuple[int, float]]] = {m: [] for m in self.directions}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, metrics: Mapping[str, float]) -> None:
        """Add an entry (``{metric: value}``; a missing metric is NaN)."""
        for name, hib in self.directions.items():
            bisect.insort(self._keys[name], _key(metrics.get(name, math.nan), hib))
        self._n += 1

    def borda(self, metrics: Mapping[str, float]) -> float:
        """The Borda count of an entry of the set: the sum over metrics of its rank
        (0 = worst), ties sharing the mean of the ranks they span."""
        total = 0.0
        for name, hib in self.directions.items():
            keys, k = self._keys[name], _key(metrics.get(name, math.nan), hib)
            lo, hi = bisect.bisect_left(keys, k), bisect.bisect_right(keys, k)
            if hi == lo:
                raise InputError(f"borda() ranks an entry of the set, and {name}="
                                 f"{metrics.get(name, math.nan)!r} is in none: add() it first")  # fmt: skip
            total += (lo + hi - 1) / 2.0
        return total


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
    import numpy as np  # (here, not above: the search layer imports this module without it)

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
    for c in range(k):  # ranks 0..m-1, 0 the worst; Borda counts 1..m
        total += np.asarray(ranks(a[:, c].tolist(), dirs[c]), dtype=np.float64) + 1.0
    return total


def borda_scores(
    metric_dicts: Sequence[Mapping[str, float]], directions: Mapping[str, bool]
) -> list[float]:
    """Borda count of each entry: the sum over metrics of its rank (0 = worst) in the set.

    The search's form of :func:`borda`, ``borda(...) - k`` for k metrics, and defined on an
    empty set or no metric too (zeros).

    Args:
        metric_dicts: (m,) ``{metric: value}``; a metric missing from an entry is NaN there.
        directions: ``metric -> higher_is_better``: the metrics that count.

    Returns:
        (m,) Borda totals as Python floats.
    """
    total = [0.0] * len(metric_dicts)
    for name, hib in directions.items():
        vals = [d.get(name, math.nan) for d in metric_dicts]
        for i, r in enumerate(ranks(vals, hib)):
            total[i] += r
    return total
