"""Training-free NAS search algorithms over any :class:`~fastntk.spaces.base.SearchSpace`.

Four algorithms, one calling convention ``algo(space, scorer, *, budget=None,
time_budget=None, seed=0, journal=None, progress=False, **algo_params)``:

* :func:`random_search`: uniform samples, without repeats.
* :func:`regularized_evolution`: Real et al. (2019), "aging evolution":
  a population of ``population_size``; each cycle draws ``sample_size``
  members, mutates the fittest, appends the child and removes the OLDEST
  member (not the worst).
* :func:`prune_search`: TE-NAS-style pruning of a supernet's edges. Every
  decision (an NB201 edge) starts with all its ops (on a supernet space, all but
  its ``supernet_excluded``: NB201's ``none``, as in TE-NAS); each round removes, from
  every decision that still has more than one op, the op whose removal hurts
  the score least, until one op per decision is left. Spaces that can build
  supernets (``space.supernet(ops_per_decision)``: NAS-Bench-201, whose edges
  then average their remaining ops) are scored as TE-NAS does, on the supernet
  without each remaining op (see :func:`prune_search`). Other spaces are
  scored **per op**: a round draws
  ``samples_per_op`` context architectures uniformly from the remaining ops;
  for each remaining (decision, op) it evaluates each context with that op
  on that decision (common random numbers: the ops of one decision are
  compared in the same contexts); the op's score is the mean fitness of those
  architectures (fitness = the metric, or the Borda count over the round's
  architectures for several metrics). The op with the LOWEST score is the
  one whose removal hurts least, and is removed.
* :func:`reinforce`: REINFORCE (Williams, 1992) with an independent
  categorical policy (softmax over logits) per decision, an exponential
  moving-average baseline (``baseline_decay``) and learning rate ``lr``. The
  reward of an architecture is its fitness quantile among all architectures
  evaluated so far (in [0, 1]): scale-free, so condition numbers (1e2..1e8)
  and correlations (-1..1) train the policy alike.

Scoring: a :class:`Scorer` wraps ``fn(arch) -> {metric: value}``, the metric
names and their directions (default: ``fastntk.metrics.DIRECTIONS``). With one
metric the fitness is the value (negated when lower is better); with several
it is the Borda count over the set being compared (a tournament sample, a
pruning round, the whole history for the best architecture).

Budgets: ``budget`` counts evaluations (architecture queries, whether
computed or served from the cache), ``time_budget`` seconds of wall time; at
least one is required, the search stops at whichever comes first (checked
before each evaluation). With a fixed ``seed`` and an evaluation budget a
search is reproducible: the same archs in the same order. A
:class:`~fastntk.search.journal.Journal` makes it resumable: each evaluation
is looked up there first and recorded as soon as it is computed, so
re-running the same command continues where it was killed, evaluates nothing
twice and follows the same trajectory.

Progress: ``progress=True`` draws a bar (count, eval/s, best so far) on stderr,
a text stream draws it there, ``None`` draws it on stderr only where that is a
terminal, ``False`` (the default) draws none.

Pruning and REINFORCE need categorical decisions: a space that has
``decisions()``, ``to_choices(arch)`` and ``from_choices(choices)`` (DARTS,
ResNet and ViT here), or NB201 (its six edges, adapted here).
"""

from __future__ import annotations

import math
import numbers
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastntk._args import integer
from fastntk._progress import bar as progress_bar
from fastntk.errors import OptionError
from fastntk.metrics.ranking import borda_scores
from fastntk.search.journal import space_key

__all__ = [
    "ALGORITHMS",
    "Evaluation",
    "Scorer",
    "SearchResult",
    "borda_scores",
    "categorical",
    "prune_search",
    "random_search",
    "regularized_evolution",
    "reinforce",
    "run_search",
]


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Results, budget, progress
# ---------------------------------------------------------------------------


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


def _real(v: Any) -> bool:
    """A real number (numpy floats too), not a bool or a string."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class _Stop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _fmt_metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


class _Runner:
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
        if time_budget is not None and not (_real(time_budget) and time_budget > 0
                                            and math.isfinite(time_budget)):  # fmt: skip
            raise OptionError(f"the time budget must be positive, finite seconds, got "
                              f"{time_budget!r}")  # fmt: skip
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
        self.cache: dict[str, dict[str, float]] = {}
        # scored ahead by prefetch() (and journaled), not yet taken by evaluate()
        self.pending: dict[str, tuple[dict[str, float], float]] = {}
        self.n_computed = self.n_cached = 0
        self.t0 = time.monotonic()
        # the bar's postfix: the best evaluation so far ("best supernet" while prune scores
        # supernets), recomputed at most every 0.2 s for a Borda count over the history
        self.what = what
        self.bar = progress_bar(budget, algorithm, "eval", show, file=stream,
                                postfix=f"{what}: -")  # fmt: skip
        self._best_idx: int | None = None
        self._best_shown = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def check(self, reserve: int = 0) -> None:
        if self.budget is not None and len(self.history) + reserve >= self.budget:
            raise _Stop("budget")
        if self.time_budget is not None and self.elapsed() >= self.time_budget:
            raise _Stop("time")

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
            elif time.monotonic() - self._best_shown >= 0.2:
                self._best_shown = time.monotonic()
                label = _fmt_metrics(self.best().metrics)
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


# ---------------------------------------------------------------------------
# Categorical view of a space (pruning, REINFORCE)
# ---------------------------------------------------------------------------


class _NB201Decisions:
    def __init__(self, space):
        from fastntk.spaces import nb201

        self._nb = nb201
        self.space = space

    def decisions(self):
        return [(f"{j}<-{k}", tuple(self._nb.OPS)) for j, k in self._nb.EDGES]

    def to_choices(self, arch):
        return tuple(self._nb.parse_arch(self.space.encode(arch)))

    def from_choices(self, choices):
        return self._nb.format_arch(list(choices))


def categorical(space) -> Any:
    """An object with ``decisions()``, ``to_choices(arch)``, ``from_choices(choices)`` for
    ``space`` (the space itself when it has them; an adapter for NB201).

    Raises:
        OptionError: the space has no categorical decisions.
    """
    if all(hasattr(space, a) for a in ("decisions", "to_choices", "from_choices")):
        return space
    if getattr(space, "name", None) == "nb201":
        return _NB201Decisions(space)
    raise OptionError(
        f"space {getattr(space, 'name', space)!r} has no categorical decisions "
        "(decisions/to_choices/from_choices) needed by pruning and REINFORCE"
    )


# ---------------------------------------------------------------------------
# Algorithms
# ---------------------------------------------------------------------------


def random_search(
    space,
    scorer: Scorer,
    *,
    budget: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    journal=None,
    progress: Any = False,
    max_tries: int = 1000,
) -> SearchResult:
    """Uniform random search without repeats (``max_tries`` draws to find an unseen arch)."""
    max_tries = integer(max_tries, "max_tries", lo=1)
    run = _Runner("random", space, scorer, budget, time_budget, seed, journal, progress)
    rng = random.Random(run.seed)
    reason = "budget"
    try:
        while True:
            run.check()
            batch: list[Any] = []  # the draws one process makes, scored together
            seen: set[str] = set()
            exhausted = False
            for _ in range(run.room()):
                for _ in range(max_tries):
                    arch = space.sample(rng)
                    enc = space.encode(arch)
                    if enc not in run.cache and enc not in seen:
                        break
                else:
                    exhausted = True
                    break
                batch.append(arch)
                seen.add(enc)
            run.prefetch(batch)
            for arch in batch:
                run.evaluate(arch)
            if exhausted:
                raise _Stop("exhausted")
    except _Stop as s:
        reason = s.reason
    return run.result(reason)


def regularized_evolution(
    space,
    scorer: Scorer,
    *,
    budget: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    journal=None,
    progress: Any = False,
    population_size: int = 20,
    sample_size: int = 5,
) -> SearchResult:
    """Regularised (aging) evolution of Real et al.; ``sample_size`` <= ``population_size``.

    The first ``population_size`` evaluations are uniform samples; every later
    one is a mutation of the fittest of ``sample_size`` members drawn without
    replacement; the oldest member then dies. ``result.population`` is the
    final population (oldest first).
    """
    population_size = integer(population_size, "population_size")
    sample_size = integer(sample_size, "sample_size")
    if population_size < 1 or not 1 <= sample_size <= population_size:
        raise OptionError(
            f"need 1 <= sample_size ({sample_size}) <= population_size ({population_size})"
        )
    run = _Runner("rea", space, scorer, budget, time_budget, seed, journal, progress)
    rng = random.Random(run.seed)
    population: deque[Evaluation] = deque()
    sizes: list[int] = []
    reason = "budget"
    try:
        first = [space.sample(rng) for _ in range(population_size)]  # (no scores drawn on)
        run.prefetch(first[: run.room()])
        for arch in first:
            population.append(run.evaluate(arch))
        while True:
            run.check()
            # batch-synchronous with a scorer of width W: W children of the same population
            # (W tournaments), scored together, then aged in one at a time (W = 1: one
            # process's trajectory)
            children = []
            for _ in range(run.room()):
                members = rng.sample(list(population), sample_size)
                fit = scorer.fitness([m.metrics for m in members])
                parent = members[max(range(len(members)), key=lambda k: (fit[k], -k))]
                children.append(space.mutate(parent.arch, rng))
            run.prefetch(children)
            for arch in children:
                population.append(run.evaluate(arch))
                population.popleft()
                sizes.append(len(population))
    except _Stop as s:
        reason = s.reason
    return run.result(
        reason, population=[e.encoding for e in population], extra={"population_sizes": sizes}
    )


def _within(run: _Runner, archs: list[Any]) -> list[Any]:
    """The first of ``archs`` a round can evaluate within the budget (one unit kept for
    the final architecture)."""
    return archs if run.budget is None else archs[: max(0, run.budget - len(run.history) - 1)]


def _drop_lowest(alive, op_score, names, choices) -> dict[str, Any]:
    """Remove, from every decision with more than one op left, its lowest-scoring op."""
    removed = {}
    for d in range(len(alive)):
        if len(alive[d]) > 1:
            k = min(alive[d], key=lambda k, d=d: (op_score[(d, k)], k))
            alive[d].remove(k)
            removed[names[d]] = choices[d][k]
    return removed


def prune_search(
    space,
    scorer: Scorer,
    *,
    budget: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    journal=None,
    progress: Any = False,
    samples_per_op: int = 1,
) -> SearchResult:
    """TE-NAS-style pruning.

    Spaces with a ``supernet(ops_per_decision) -> encoding`` method (NAS-Bench-201)
    are pruned as TE-NAS does: every round scores the supernet (each edge averages its
    remaining ops) once without each remaining op, and removes on every edge the op
    whose removal leaves the best-scoring supernet, until one op per edge is left.
    The ops a space lists as ``supernet_excluded`` are removed before the first round, as
    TE-NAS removes ``none`` (NB201: 24 + 18 + 12 = 54 supernet evaluations, plus the final
    architecture). Sharing the full supernet's weights across a round's candidates, as
    TE-NAS does, is the scoring function's part (the CLI's does it).
    These rounds draw no samples: ``samples_per_op`` other than 1 is an error there.
    Other spaces use per-op scoring in ``samples_per_op`` shared random contexts
    (module docstring).

    ``result.best`` is the final pruned architecture (evaluated with the last
    unit of the budget); ``result.extra["rounds"]`` lists, per complete round, the
    ops removed (``{decision: op}``).

    If the budget runs out mid-round, that round's scores are not used (they come
    from part of the round: for several metrics, Borda counts over a smaller set) and
    it removes nothing; ``result.extra["partial_round"]`` counts its evaluations (and
    ``result.extra["note"]`` says so in words; None when pruning finished). Every
    decision with more than one op left then takes, among them, the op that scored
    best in the last complete round (every remaining op was scored there, in the same
    round, against the same set); if no round completed, it takes one of its ops drawn
    uniformly (seeded by ``seed``), not a fixed one. The progress bar's last line says so.
    """
    samples_per_op = integer(samples_per_op, "samples_per_op", lo=1)
    view = categorical(space)
    decisions = view.decisions()
    names = [n for n, _ in decisions]
    choices = [tuple(ch) for _, ch in decisions]
    alive: list[list[int]] = [list(range(len(ch))) for ch in choices]  # indices into choices
    supernet = getattr(space, "supernet", None)
    if supernet is not None:  # TE-NAS removes these ops before its first round
        gone = set(getattr(space, "supernet_excluded", ()))
        alive = [[k for k in a if choices[d][k] not in gone] or a for d, a in enumerate(alive)]
    if supernet is not None and samples_per_op != 1:
        raise OptionError(f"samples_per_op applies to per-op pruning; space "
                          f"{getattr(space, 'name', space)!r} is pruned on supernets (TE-NAS), "
                          f"which draw no samples: leave samples_per_op at 1, got "
                          f"{samples_per_op}")  # fmt: skip
    # the rounds score supernets, not archs: the progress bar says so
    run = _Runner(
        "prune",
        space,
        scorer,
        budget,
        time_budget,
        seed,
        journal,
        progress,
        what="best" if supernet is None else "best supernet",
    )
    rng = random.Random(run.seed)
    rounds: list[dict[str, Any]] = []
    # (decision, choice index) -> score in the last COMPLETE round (higher: worth keeping)
    op_score: dict[tuple[int, int], float] = {}
    evs: list[tuple[tuple[int, int], Evaluation]] = []  # the current round's evaluations
    reason = "done"

    def arch_of(idx: Sequence[int]) -> Any:
        return view.from_choices([choices[d][k] for d, k in enumerate(idx)])

    try:
        while supernet is not None and any(len(a) > 1 for a in alive):
            # TE-NAS: score the supernet without each remaining op; on every edge drop the
            # op whose removal leaves the best-scoring supernet (the least useful op).
            cands = [(d, k) for d in range(len(alive)) if len(alive[d]) > 1 for k in alive[d]]
            evs = []
            nets = [supernet([[choices[e][i] for i in a if (e, i) != (d, k)]
                              for e, a in enumerate(alive)]) for d, k in cands]  # fmt: skip
            run.prefetch(_within(run, nets))
            for (d, k), net in zip(cands, nets, strict=True):
                evs.append(((d, k), run.evaluate(net, reserve=1)))
            fit = scorer.fitness([e.metrics for _, e in evs])
            # stored negated: a low removal score marks an op worth keeping
            op_score = {key: -f for (key, _), f in zip(evs, fit, strict=True)}
            evs = []
            rounds.append(_drop_lowest(alive, op_score, names, choices))
        while any(len(a) > 1 for a in alive):
            cands = [(d, k) for d in range(len(alive)) if len(alive[d]) > 1 for k in alive[d]]
            # common random numbers: every candidate of the round is scored in the same
            # contexts (other decisions), so ops of one decision are compared pairwise.
            bases = [[a[rng.randrange(len(a))] for a in alive] for _ in range(samples_per_op)]
            evs = []
            keyed = [((d, k), arch_of([*base[:d], k, *base[d + 1 :]])) for d, k in cands
                     for base in bases]  # fmt: skip
            run.prefetch(_within(run, [a for _, a in keyed]))
            for key, arch in keyed:
                evs.append((key, run.evaluate(arch, reserve=1)))
            fit = scorer.fitness([e.metrics for _, e in evs])
            acc: dict[tuple[int, int], list[float]] = {}
            for (key, _), f in zip(evs, fit, strict=True):
                acc.setdefault(key, []).append(f)
            op_score = {key: sum(v) / len(v) for key, v in acc.items()}
            evs = []
            rounds.append(_drop_lowest(alive, op_score, names, choices))
    except _Stop as s:
        reason = s.reason
    partial = len(evs)  # evaluations of an unfinished round: not used
    pick = random.Random(f"prune-final:{run.seed}")
    final_idx = []
    for d, a in enumerate(alive):
        if all((d, k) in op_score for k in a):
            final_idx.append(max(a, key=lambda k, d=d: (op_score[(d, k)], -k)))
        else:  # no complete round yet: no information to prefer one op
            final_idx.append(a[pick.randrange(len(a))])
    final = arch_of(final_idx)
    enc = space.encode(final)
    if enc in run.cache:
        best = next(e for e in reversed(run.history) if e.encoding == enc)
    else:
        best = run.evaluate(final, force=True)
    what = "final arch"
    note = None
    if partial:  # say that the unfinished round's evaluations decided nothing
        how = f"decided by round {len(rounds)}" if rounds else "ops left drawn at random"
        note = (
            f"round {len(rounds) + 1} unfinished, its {partial} "
            f"evaluation{'s' if partial != 1 else ''} unused; {how}"
        )
        what += f" ({note})"
    return run.result(
        reason,
        best=best,
        what=what,
        extra={"rounds": rounds, "partial_round": partial, "note": note},
    )


def reinforce(
    space,
    scorer: Scorer,
    *,
    budget: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    journal=None,
    progress: Any = False,
    lr: float = 0.2,
    baseline_decay: float = 0.9,
) -> SearchResult:
    """REINFORCE over categorical decisions (see the module docstring).

    ``result.extra["policy"]`` is the final policy: ``{decision: {choice: prob}}``;
    ``result.extra["rewards"]`` the reward of each step.
    """
    if not (_real(lr) and lr > 0 and math.isfinite(lr)):
        raise OptionError(f"lr must be a positive, finite number, got {lr!r}")
    if not (_real(baseline_decay) and 0 <= baseline_decay < 1):
        raise OptionError(f"baseline_decay must be a number in [0, 1), got {baseline_decay!r}")
    view = categorical(space)
    decisions = view.decisions()
    logits = [[0.0] * len(ch) for _, ch in decisions]
    run = _Runner("reinforce", space, scorer, budget, time_budget, seed, journal, progress)
    rng = random.Random(run.seed)
    baseline: float | None = None
    fits: list[float] = []
    rewards: list[float] = []
    reason = "budget"

    def softmax(v: list[float]) -> list[float]:
        m = max(v)
        e = [math.exp(x - m) for x in v]
        s = sum(e)
        return [x / s for x in e]

    def update(idx: list[int], probs: list[list[float]], ev: Evaluation) -> None:
        """The policy-gradient step of one evaluated sample (its reward: a quantile)."""
        nonlocal baseline
        if len(scorer.metrics) == 1:
            f = scorer.fitness([ev.metrics])[0]
            fits.append(f)
            below = sum(1 for x in fits if x < f)
            equal = sum(1 for x in fits if x == f) - 1
            reward = 0.5 if len(fits) == 1 else (below + 0.5 * equal) / (len(fits) - 1)
        else:
            # Borda of the new arch among all so far, over its maximum: mean quantile.
            allfit = scorer.fitness([e.metrics for e in run.history])
            n = len(allfit)
            reward = 0.5 if n == 1 else allfit[-1] / (len(scorer.metrics) * (n - 1))
        rewards.append(reward)
        baseline = (
            reward
            if baseline is None
            else (baseline_decay * baseline + (1 - baseline_decay) * reward)
        )
        adv = reward - baseline
        for lg, p, k in zip(logits, probs, idx, strict=True):
            for j in range(len(lg)):
                lg[j] += lr * adv * ((1.0 if j == k else 0.0) - p[j])

    try:
        while True:
            run.check()
            # batch-synchronous with a scorer of width W: W samples of the same policy,
            # scored together, then the policy updated by each in turn (W = 1: one
            # process's trajectory)
            probs = [softmax(lg) for lg in logits]
            drawn = [_draw(probs, rng) for _ in range(run.room())]
            archs = [view.from_choices([ch[k] for (_, ch), k in zip(decisions, idx, strict=True)])
                     for idx in drawn]  # fmt: skip
            run.prefetch(archs)
            for idx, arch in zip(drawn, archs, strict=True):
                update(idx, probs, run.evaluate(arch))
    except _Stop as s:
        reason = s.reason
    policy = {
        name: {str(c): p for c, p in zip(ch, softmax(lg), strict=True)}
        for (name, ch), lg in zip(decisions, logits, strict=True)
    }
    return run.result(reason, extra={"policy": policy, "rewards": rewards})


def _draw(probs: list[list[float]], rng: random.Random) -> list[int]:
    """One choice per decision from the policy's probabilities (inverse CDF)."""
    idx = []
    for p in probs:
        u, acc, pick = rng.random(), 0.0, len(p) - 1
        for k, pk in enumerate(p):
            acc += pk
            if u < acc:
                pick = k
                break
        idx.append(pick)
    return idx


ALGORITHMS: dict[str, Callable[..., SearchResult]] = {
    "random": random_search,
    "rea": regularized_evolution,
    "prune": prune_search,
    "reinforce": reinforce,
}


def run_search(algorithm: str, space, scorer: Scorer, **kwargs: Any) -> SearchResult:
    """Dispatch to ``ALGORITHMS[algorithm]``; OptionError lists the known names."""
    fn = ALGORITHMS.get(algorithm)
    if fn is None:
        raise OptionError(f"unknown search algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    return fn(space, scorer, **kwargs)
