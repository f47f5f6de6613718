"""How a search compares architectures: :class:`Scorer`, the metric values of an
architecture and their fitness (the value, or a Borda count over several metrics)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from fastntk.errors import OptionError
from fastntk.metrics.ranking import borda_scores

__all__ = ["Scorer"]


class Scorer:
    """Metric values of an architecture, and how to compare them.

    Args:
        fn: ``fn(arch) -> {metric: value}``; must return at least ``metrics``, as numbers.
        metrics: the metric names that count (a list, or a comma-separated string);
            repeated names count once (order kept).
        directions: ``metric -> higher_is_better``; default from
            ``fastntk.metrics.DIRECTIONS``.
        settings: everything that determines the values (the journal key);
            default ``{"metrics": metrics}``; ``"revisions"`` of revised metrics
            (``fastntk.metrics.REVISIONS``) is added to it. A journal row of these settings that lacks
            one of ``metrics`` is completed: the architecture is scored again and the
            row gains the missing values.
    """

    def __init__(
        self,
        fn: Callable[[Any], Mapping[str, float]],
        metrics: str | Sequence[str],
        directions: Mapping[str, bool] | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
    ):
        given = metrics
        if isinstance(metrics, str):
            metrics = [m.strip() for m in metrics.split(",") if m.strip()]
        elif isinstance(metrics, Iterable):
            metrics = list(metrics)  # (dict keys, sets and generators too)
        if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
            raise OptionError(f"metrics must be a metric name, a comma-separated string or "
                              f"names, got {given!r}")  # fmt: skip
        self.metrics = list(dict.fromkeys(metrics))  # duplicates count once, order kept
        if not self.metrics:
            raise OptionError("a scorer needs at least one metric")
        if directions is None:
            from fastntk.metrics import DIRECTIONS

            directions = DIRECTIONS
        missing = [m for m in self.metrics if m not in directions]
        if missing:
            raise OptionError(
                f"no direction known for metric(s) {', '.join(missing)}; known: "
                f"{', '.join(sorted(directions))}"
            )
        self.directions = {m: bool(directions[m]) for m in self.metrics}
        self.fn = fn
        self.settings = dict(settings) if settings is not None else {"metrics": self.metrics}
        from fastntk.metrics import REVISIONS

        revised = {m: REVISIONS[m] for m in self.metrics if m in REVISIONS}
        if revised:  # scores stored before a metric's revision are not served as today's
            self.settings.setdefault("revisions", revised)

    def __call__(self, arch: Any) -> dict[str, float]:
        out = self.fn(arch)
        if not isinstance(out, Mapping):
            raise OptionError(f"the scoring function must return a dict of metrics, got "
                              f"{type(out).__name__}")  # fmt: skip
        missing = [m for m in self.metrics if m not in out]
        if missing:
            raise OptionError(f"the scoring function returned no {', '.join(missing)} (it gave "
                              f"{', '.join(map(str, out)) or 'nothing'})")  # fmt: skip
        values = {}
        for m in self.metrics:
            v = out[m]
            try:
                if isinstance(v, (str, bytes)):
                    raise TypeError
                values[m] = float(v)
            except (TypeError, ValueError):
                raise OptionError(
                    f"the scoring function returned a non-number for metric "
                    f"{m!r}: {v!r} ({type(v).__name__})"
                ) from None
        return values

    #: architectures it scores at once (:class:`fastntk.search.workers.ParallelScorer`: the
    #: ranks of a process group); the algorithms ask for batches this wide
    width = 1

    def map(self, archs: Sequence[Any]) -> list[tuple[dict[str, float], float]]:
        """(metrics, seconds) of each architecture, in order (here one after another)."""
        out = []
        for a in archs:
            t = time.monotonic()
            out.append((self(a), time.monotonic() - t))
        return out

    def fitness(self, metric_dicts: Sequence[Mapping[str, float]]) -> list[float]:
        """Fitness of each entry within the set (higher is better; NaN is worst: -inf,
        below the worst number, which a metric's own -inf, e.g. an NCN beyond float32,
        becomes: the most negative float)."""
        if len(self.metrics) == 1:
            (m,) = self.metrics
            sign = 1.0 if self.directions[m] else -1.0
            out = []
            for d in metric_dicts:
                v = float(d.get(m, math.nan))
                out.append(-math.inf if math.isnan(v) else max(sign * v, -sys.float_info.max))
            return out
        return borda_scores(metric_dicts, self.directions)
