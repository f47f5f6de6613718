"""Training-free NAS search algorithms over any :class:`~fastntk.spaces.base.SearchSpace`.

Four algorithms, one calling convention ``algo(space, scorer, *, budget=None,
time_budget=None, seed=0, journal=None, progress=False, **algo_params)``:

* :func:`random_search`: uniform samples, without repeats.
* :func:`regularized_evolution`: Real et al. (2019), "aging evolution":
  a population of ``population_size``; each cycle draws ``sample_size``
  members, mutates the fittest (ranked among every evaluation so far, as the
  returned best is), appends the child and removes the OLDEST member (not the
  worst).
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

Scoring: a :class:`~fastntk.search.scorer.Scorer` wraps ``fn(arch) -> {metric: value}``,
the metric names and their directions (default: ``fastntk.metrics.DIRECTIONS``). With one
metric the fitness is the value (negated when lower is better); with several
it is the Borda count over the set being compared (a pruning round; the whole
history for evolution's tournaments and for the best architecture).

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
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from fastntk._args import integer, real
from fastntk.errors import OptionError
from fastntk.search.runner import Evaluation, Runner, SearchResult, Stop
from fastntk.search.scorer import Scorer

__all__ = [
    "ALGORITHMS",
    "categorical",
    "prune_search",
    "random_search",
    "regularized_evolution",
    "reinforce",
    "run_search",
]


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
    run = Runner("random", space, scorer, budget, time_budget, seed, journal, progress)
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
                raise Stop("exhausted")
    except Stop as s:
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

    Fitness in a tournament is the member's fitness among every evaluation so far
    (with several metrics, its Borda count over the whole history): the order in
    which ``result.best`` is chosen. A Borda count over the 5 members alone is
    coarse (ranks 0..4 per metric) and can order two members unlike the history
    does. Measured on NAS-Bench-201 with the default four-metric score, 100
    seeds of budget 100 (``python bench/nb201_search.py --seeds 100 --budget
    100``): the returned architecture's mean top-% on CIFAR-10 / CIFAR-100 /
    ImageNet16-120 3.4 / 4.5 / 4.2 with history ranks against 4.5 / 6.5 / 4.5
    within the tournament (the same command at commit 2ac2712, with ``--algos rea
    --out`` a new file); with Borda(lga, num_params) 4.2 / 5.0 / 10.9 against
    4.0 / 5.0 / 11.4. With one metric the two orders are the same.
    """
    population_size = integer(population_size, "population_size")
    sample_size = integer(sample_size, "sample_size")
    if population_size < 1 or not 1 <= sample_size <= population_size:
        raise OptionError(
            f"need 1 <= sample_size ({sample_size}) <= population_size ({population_size})"
        )
    run = Runner("rea", space, scorer, budget, time_budget, seed, journal, progress)
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
                fit = [run.standing.borda(m.metrics) for m in members]
                parent = members[max(range(len(members)), key=lambda k: (fit[k], -k))]
                children.append(space.mutate(parent.arch, rng))
            run.prefetch(children)
            for arch in children:
                population.append(run.evaluate(arch))
                population.popleft()
                sizes.append(len(population))
    except Stop as s:
        reason = s.reason
    return run.result(
        reason, population=[e.encoding for e in population], extra={"population_sizes": sizes}
    )


def _within(run: Runner, archs: list[Any]) -> list[Any]:
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
    run = Runner(
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
    except Stop as s:
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
    lr = real(lr, "lr", strict=True)
    if real(baseline_decay, "baseline_decay") >= 1:
        raise OptionError(f"baseline_decay must be a number in [0, 1), got {baseline_decay!r}")
    view = categorical(space)
    decisions = view.decisions()
    logits = [[0.0] * len(ch) for _, ch in decisions]
    run = Runner("reinforce", space, scorer, budget, time_budget, seed, journal, progress)
    rng = random.Random(run.seed)
    baseline: float | None = None
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
        # its Borda count among all so far over the count's maximum: the mean of its
        # quantiles (one metric: #worse + #tied / 2 over the others)
        n = len(run.standing)
        reward = 0.5 if n == 1 else run.standing.borda(ev.metrics) / (len(scorer.metrics) * (n - 1))
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
    except Stop as s:
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
