"""What every search algorithm runs on: :class:`Runner` evaluates architectures within the
budgets, through the cache and the journal, keeps the history and draws the progress bar;
:class:`SearchResult` is what a search returns."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastntk._args import integer, real
from fastntk._progress import bar as progress_bar
from fastntk.errors import OptionError
from fastntk.metrics.ranking import RunningBorda
from fastntk.search.journal import space_key

__all__ = ["Evaluation", "Runner", "SearchResult", "Stop"]


@dataclass
class Evaluation:
    """One architecture query of a search."""

    step: int
    arch: Any
    encoding: str
    metrics: dict[str, float]
    cached: bool
    elapsed: float


@dataclass
class SearchResult:
    """What a search returns.

    ``best`` is the fittest evaluation of ``history`` (for pruning: the final
    pruned architecture); ``space`` the journal's key of the space
    (:func:`~fastntk.search.journal.space_key`: its name, plus any non-default
    configuration); ``stop_reason`` is ``"budget"``, ``"time"``,
    ``"exhausted"`` (no new architectures) or ``"done"`` (pruning finished).
    """

    algorithm: str
    space: str
    seed: int
    best: Evaluation | None
    history: list[Evaluation]
    n_computed: int
    n_cached: int
    elapsed: float
    stop_reason: str
    population: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_evaluations(self) -> int:
        return len(self.history)

    @property
    def encodings(self) -> list[str]:
        return [e.encoding for e in self.history]


class Stop(Exception):
    """Raised by :meth:`Runner.check` when a budget is spent; ``reason``: "budget" or "time"."""

    def __init__(self, reason: str):
        self.reason = reason


def _fmt_metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class Runner:
    """Evaluates architectures for an algorithm: budget, cache/journal, history, progress."""

    def __init__(
        self,
        algorithm,
        space,
        scorer,
        budget,
        time_budget,
        seed,
        journal,
        progress,
        what: str = "best",
    ):
        if budget is None and time_budget is None:
            raise OptionError("give an evaluation budget, a time budget, or both")
        if budget is not None:
            budget = integer(budget, "the evaluation budget", lo=1)
        seed = integer(seed, "seed")
        if time_budget is not None:
            time_budget = real(time_budget, "the time budget (seconds)", strict=True)
        if journal is not None:
            if not all(callable(getattr(journal, a, None)) for a in ("get", "record")):
                raise OptionError(f"journal must be a fastntk.search.Journal (open one with "
                                  f"Journal(path)), got {journal!r}")  # fmt: skip
            if scorer.settings.get("seed") is not None:  # before anything is computed
                integer(scorer.settings["seed"], "the seed in the scorer's settings (stored in "
                        "the journal)", -(2**63), 2**63)  # fmt: skip
        if progress is None or isinstance(progress, bool):  # None: on stderr if a terminal
            show, stream = progress, None
        elif callable(getattr(progress, "write", None)):
            show, stream = True, progress
        else:
            raise OptionError(f"progress must be True, False, None or a text stream, got "
                              f"{progress!r}")  # fmt: skip
        self.algorithm, self.space, self.scorer = algorithm, space, scorer
        self.budget, self.time_budget, self.seed, self.journal = budget, time_budget, seed, journal
        self.space_name = getattr(space, "name", type(space).__name__)
        self.space_key = space_key(space)  # the journal's key: name + configuration
        self.history: list[Evaluation] = []
        # the Borda count of each evaluation among the whole history (one metric: its rank,
        # the value's order), read without re-ranking the history (REA, REINFORCE)
        self.standing = RunningBorda(scorer.directions)
        self.cache: dict[str, dict[str, float]] = {}
        # scored ahead by prefetch() (and journaled), not yet taken by evaluate()
        self.pending: dict[str, tuple[dict[str, float], float]] = {}
        self.n_computed = self.n_cached = 0
        self.t0 = time.monotonic()
        # the bar's postfix: the best evaluation so far ("best supernet" while prune scores
        # supernets); for a Borda count over the history (a sort, whose cost grows with it)
        # recomputed after 0.2 s, or 20 times its last cost, whichever is later
        self.what = what
        self.bar = progress_bar(budget, algorithm, "eval", show, file=stream,
                                postfix=f"{what}: -")  # fmt: skip
        self._best_idx: int | None = None
        self._best_due = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def check(self, reserve: int = 0) -> None:
        if self.budget is not None and len(self.history) + reserve >= self.budget:
            raise Stop("budget")
        if self.time_budget is not None and self.elapsed() >= self.time_budget:
            raise Stop("time")

    def room(self) -> int:
        """How many architectures the next batch may hold: the scorer's width, within the
        evaluation budget left."""
        left = self.scorer.width if self.budget is None else self.budget - len(self.history)
        return max(1, min(self.scorer.width, left))

    def _stored(self, enc: str) -> tuple[dict[str, float] | None, dict | None]:
        """(the journal's complete metrics of ``enc``, or None; its row, or None)."""
        if self.journal is None:
            return None, None
        stored = self.journal.get(self.space_key, enc, self.scorer.settings)
        # a row that lacks a requested metric (settings that do not list the metrics)
        # is not a cache hit: the arch is scored again and the row completed
        if stored is not None and all(m in stored for m in self.scorer.metrics):
            return {m: float(stored[m]) for m in self.scorer.metrics}, stored
        return None, stored

    def _record(self, enc: str, metrics: dict[str, float], dt: float, stored) -> None:
        if self.journal is not None:
            s = self.scorer.settings
            self.journal.record(self.space_key, enc, s, metrics, seed=s.get("seed"),
                                data=s.get("data"), elapsed=dt, merge=stored is not None)  # fmt: skip

    def prefetch(self, archs: Sequence[Any]) -> None:
        """Score the archs that neither the cache nor the journal holds, together (the
        scorer's ranks: :class:`~fastntk.search.workers.ParallelScorer`), and journal them
        at once, ahead of :meth:`evaluate` taking them in order. Nothing to do for a
        scorer of width 1: :meth:`evaluate` scores each itself, as one process does."""
        if self.scorer.width <= 1:
            return
        todo, rows = [], {}
        for a in archs:
            enc = self.space.encode(a)
            if enc in self.cache or enc in self.pending or enc in rows:
                continue
            metrics, stored = self._stored(enc)
            if metrics is None:
                todo.append(a)
                rows[enc] = stored
        for a, (metrics, dt) in zip(todo, self.scorer.map(todo), strict=True):
            enc = self.space.encode(a)
            self._record(enc, metrics, dt, rows[enc])
            self.pending[enc] = (metrics, dt)

    def evaluate(self, arch: Any, reserve: int = 0, force: bool = False) -> Evaluation:
        if not force:
            self.check(reserve)
        enc = self.space.encode(arch)
        t = time.monotonic()
        metrics = self.cache.get(enc)
        cached = metrics is not None
        ahead = self.pending.pop(enc, None)
        if ahead is not None:  # scored (and journaled) by prefetch: computed, not cached
            metrics = ahead[0]
        elif metrics is None:
            metrics, stored = self._stored(enc)
            cached = metrics is not None
            if metrics is None:
                metrics = self.scorer(arch)
                self._record(enc, metrics, time.monotonic() - t, stored)
        if cached:
            self.n_cached += 1
        else:
            self.n_computed += 1
        self.cache[enc] = metrics
        ev = Evaluation(len(self.history), arch, enc, dict(metrics), cached, time.monotonic() - t)
        self.history.append(ev)
        self.standing.add(ev.metrics)
        self._update_best(ev)
        return ev

    def _update_best(self, ev: Evaluation) -> None:
        """Step the bar; its postfix names the best evaluation so far."""
        if not self.bar.disable:
            label = None
            if len(self.scorer.metrics) == 1:
                if self._best_idx is None or (
                    self.scorer.fitness([ev.metrics])[0]
                    > self.scorer.fitness([self.history[self._best_idx].metrics])[0]
                ):
                    self._best_idx = ev.step
                label = _fmt_metrics(self.history[self._best_idx].metrics)
            elif time.monotonic() >= self._best_due:
                t = time.monotonic()
                label = _fmt_metrics(self.best().metrics)
                self._best_due = t + max(0.2, 20 * (time.monotonic() - t))
            if label is not None:
                self.bar.set_postfix_str(f"{self.what}: {label}", refresh=False)
            if self.bar.total is not None and len(self.history) > self.bar.total:
                self.bar.total = len(self.history)  # prune's final arch, past the budget
        self.bar.update()

    def best(self) -> Evaluation | None:
        if not self.history:
            return None
        fit = self.scorer.fitness([e.metrics for e in self.history])
        i = max(range(len(fit)), key=lambda k: (fit[k], -k))
        return self.history[i]

    def result(
        self, reason: str, best: Evaluation | None = None, what: str | None = None, **kw
    ) -> SearchResult:
        best = best if best is not None else self.best()
        label = _fmt_metrics(best.metrics) if best else "-"
        self.bar.set_postfix_str(f"{what or self.what}: {label}", refresh=False)
        self.bar.close()  # (its last frame, with this postfix)
        return SearchResult(
            self.algorithm,
            self.space_key,
            self.seed,
            best,
            self.history,
            self.n_computed,
            self.n_cached,
            self.elapsed(),
            reason,
            **kw,
        )
