"""Search algorithms on NTK-free toy scorers: determinism, budgets, behaviour."""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _toy_space import DIRECTIONS, ToySpace, objective, toy_metrics  # noqa: E402

from fastntk.errors import ArchitectureError, OptionError  # noqa: E402
from fastntk.search import (  # noqa: E402
    ALGORITHMS,
    Journal,
    Scorer,
    borda_scores,
    prune_search,
    random_search,
    regularized_evolution,
    reinforce,
    run_search,
)


def scorer(metrics=("good",)):
    return Scorer(toy_metrics, list(metrics), DIRECTIONS)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_deterministic_for_a_seed_and_respects_budget(algo):
    runs = [run_search(algo, ToySpace(), scorer(), budget=40, seed=s) for s in (3, 3, 4)]
    assert runs[0].encodings == runs[1].encodings
    assert runs[0].best.encoding == runs[1].best.encoding
    assert runs[0].encodings != runs[2].encodings
    for r in runs:
        assert len(r.history) <= 40
        assert r.n_computed + r.n_cached == len(r.history)
    if algo != "prune":
        assert len(runs[0].history) == 40 and runs[0].stop_reason == "budget"


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_time_budget(algo):
    def slow(a):
        time.sleep(0.01)
        return toy_metrics(a)

    t = time.monotonic()
    r = run_search(algo, ToySpace(), Scorer(slow, ["good"], DIRECTIONS), time_budget=0.15, seed=0)
    assert time.monotonic() - t < 1.0
    assert r.stop_reason == "time"
    assert 1 <= r.n_computed <= 16


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_budgets(bad):
    with pytest.raises(OptionError):
        random_search(ToySpace(), scorer(), budget=bad)
    with pytest.raises(OptionError):
        random_search(ToySpace(), scorer(), time_budget=bad)
    with pytest.raises(OptionError):
        random_search(ToySpace(), scorer())
    with pytest.raises(OptionError, match="known: random, rea, prune, reinforce"):
        run_search("bayes", ToySpace(), scorer(), budget=3)


def test_random_search_no_repeats_and_exhaustion():
    r = random_search(ToySpace(D=2, opts="ab"), scorer(), budget=10, seed=0)
    assert sorted(r.encodings) == ["aa", "ab", "ba", "bb"]
    assert r.stop_reason == "exhausted"
    assert r.best.encoding == "bb"


def test_rea_keeps_population_and_ages():
    r = regularized_evolution(
        ToySpace(), scorer(), budget=80, seed=1, population_size=10, sample_size=3
    )
    assert len(r.population) == 10
    assert r.extra["population_sizes"] == [10] * 70
    # aging: the final population is exactly the last 10 evaluations
    assert r.population == r.encodings[-10:]
    rand = [objective(ToySpace().sample(random.Random(i))) for i in range(200)]
    assert objective(r.best.encoding) > max(rand[:80])  # better than random at equal budget
    with pytest.raises(OptionError):
        regularized_evolution(ToySpace(), scorer(), budget=5, population_size=3, sample_size=4)


def test_rea_tournament_ranks_members_among_the_whole_history():
    """With several metrics the tournament's fitness is the Borda count over every
    evaluation so far (the order ``result.best`` takes), not over the members alone.
    Tournament = the whole population, so the parent of child g is determined: the
    population is history[g : g + P] (aging), ranked within history[: g + P]."""
    import hashlib

    def metrics(a):  # two metrics that disagree: Borda orders depend on the set ranked
        h = int(hashlib.sha256(a.encode()).hexdigest()[:8], 16)
        return {"good": objective(a), "noise": float(h % 997)}

    parents = []

    class Recording(ToySpace):
        def mutate(self, a, rng):
            parents.append(a)
            return super().mutate(a, rng)

    P = 6
    sc = Scorer(metrics, ["good", "noise"], {"good": True, "noise": True})
    r = regularized_evolution(Recording(), sc, budget=60, seed=2, population_size=P,
                              sample_size=P)  # fmt: skip
    encs = r.encodings
    assert len(parents) == 60 - P
    differs = 0
    for g, parent in enumerate(parents):
        seen = [metrics(a) for a in encs[: g + P]]
        ranked = borda_scores(seen, sc.directions)
        pop = range(g, g + P)
        want = max(pop, key=lambda i: (ranked[i], -i))
        assert parent == encs[want], g
        local = borda_scores(seen[g:], sc.directions)
        differs += encs[g + max(range(P), key=lambda k: (local[k], -k))] != parent
    assert differs > 0  # the two orders part somewhere on this run: the test tells them apart


@pytest.mark.parametrize("metrics", [("good",), ("good", "bad")])
def test_reinforce_reward_is_the_quantile_among_all_so_far(metrics):
    """A sample's reward is its Borda count among every evaluation so far over the
    count's maximum (one metric: its quantile, ties counting half); the first is 0.5."""
    sc = scorer(metrics)
    r = reinforce(ToySpace(D=3, opts="abc"), sc, budget=30, seed=0)
    seen = [e.metrics for e in r.history]
    assert r.extra["rewards"][0] == 0.5
    for n in range(1, len(seen)):
        want = borda_scores(seen[: n + 1], sc.directions)[-1] / (len(metrics) * n)
        assert r.extra["rewards"][n] == pytest.approx(want, rel=1e-12, abs=0), n


def test_reinforce_improves_on_toy_objective():
    r = reinforce(ToySpace(), scorer(), budget=300, seed=0, lr=0.5)
    objs = [objective(e.encoding) for e in r.history]
    first, last = sum(objs[:50]) / 50, sum(objs[-50:]) / 50
    assert last > first + 3, (first, last)
    for probs in r.extra["policy"].values():
        assert probs["e"] > probs["a"]
    assert abs(sum(r.extra["policy"]["e0"].values()) - 1) < 1e-9


def test_lower_is_better_metric_is_minimised():
    r = reinforce(ToySpace(), scorer(["neg"]), budget=200, seed=0, lr=0.5)
    objs = [objective(e.encoding) for e in r.history]
    assert sum(objs[-50:]) > sum(objs[:50])
    assert r.best.encoding == max(r.encodings, key=objective)


def test_prune_finds_additive_optimum():
    r = prune_search(ToySpace(), scorer(), budget=200, seed=0)
    assert r.stop_reason == "done"
    assert r.best.encoding == "eeeeee"
    assert len(r.history) == 30 + 24 + 18 + 12 + 1
    assert [set(rd.values()) for rd in r.extra["rounds"]] == [{c} for c in "abcd"]


def test_prune_stops_within_budget():
    r = prune_search(ToySpace(), scorer(), budget=20, seed=0)
    assert r.stop_reason == "budget"
    assert len(r.history) == 20
    ToySpace().decode(r.best.encoding)


def test_borda_multi_metric():
    s = scorer(["good", "bad"])
    ms = [toy_metrics(a) for a in ["eeeeee", "aaaaaa", "ebbbbb"]]
    f = s.fitness(ms)
    assert f[0] > f[2] > f[1]
    from fastntk.metrics import borda

    vals = [[m["good"], m["bad"]] for m in ms]
    # metrics.borda ranks 1..m, borda_scores 0..m-1: two metrics differ by 2
    assert list(borda(vals, [True, False]) - 2) == pytest.approx(
        borda_scores(ms, {"good": True, "bad": False})
    )
    r = random_search(ToySpace(), s, budget=30, seed=0)
    fit = s.fitness([e.metrics for e in r.history])
    assert r.best.metrics == {m: toy_metrics(r.best.encoding)[m] for m in ("good", "bad")}
    assert fit[r.best.step] == max(fit)


def test_nan_is_worst():
    s = Scorer(
        lambda a: {"good": float("nan") if a == "eeeeee" else objective(a)}, ["good"], DIRECTIONS
    )
    assert s.fitness([{"good": float("nan")}, {"good": -1e9}]) == [float("-inf"), -1e9]


@pytest.mark.parametrize("metric, worst", [("ncn", float("-inf")), ("cond", float("inf"))])
def test_nan_is_below_the_worst_number(metric, worst):
    """An undefined score (NaN) ranks below a defined worst one (an NCN of -inf: beyond
    what float32 resolves; a condition number of +inf): it tied with it, and the earlier
    entry won, so a search could return the NaN architecture as its best."""
    from fastntk.metrics import DIRECTIONS as D

    one = Scorer(lambda a: {}, [metric], D)
    f = one.fitness(
        [{metric: float("nan")}, {metric: worst}, {metric: 3.0 if metric == "cond" else -3.0}]
    )
    assert f[0] < f[1] < f[2] and f[0] == float("-inf")
    ms = [{metric: float("nan"), "lga": 0.5}, {metric: worst, "lga": 0.5}]
    assert borda_scores(ms, {metric: D[metric], "lga": True}) == [0.5, 1.5]
    both = Scorer(lambda a: {}, [metric, "lga"], D)
    assert both.fitness(ms) == [0.5, 1.5]


def test_journal_cache_resume_same_trajectory(tmp_path):
    db = tmp_path / "j.db"
    calls = []

    def counted(a):
        calls.append(a)
        return toy_metrics(a)

    s = Scorer(counted, ["good"], DIRECTIONS, settings={"metrics": ["good"], "seed": 0})
    with Journal(db) as j:
        r1 = regularized_evolution(
            ToySpace(), s, budget=50, seed=2, journal=j, population_size=8, sample_size=3
        )
    n1 = len(calls)
    assert n1 == len(set(r1.encodings))  # within a run, nothing is computed twice
    with Journal(db) as j:
        r2 = regularized_evolution(
            ToySpace(), s, budget=50, seed=2, journal=j, population_size=8, sample_size=3
        )
        assert len(j) == n1
    assert len(calls) == n1 and r2.n_computed == 0 and r2.n_cached == 50
    assert r2.encodings == r1.encodings
    # a longer budget continues past the journal
    with Journal(db) as j:
        r3 = regularized_evolution(
            ToySpace(), s, budget=70, seed=2, journal=j, population_size=8, sample_size=3
        )
    assert r3.encodings[:50] == r1.encodings


@pytest.mark.parametrize("algo", ["prune", "reinforce"])
def test_nb201_and_darts_decisions(algo):
    from fastntk.spaces.registry import get_space

    nb = get_space("nb201")
    conv = Scorer(lambda a: {"good": float(a.count("nor_conv_3x3"))}, ["good"], DIRECTIONS)
    r = run_search(algo, nb, conv, budget=120, seed=0)
    nb.decode(r.best.encoding)
    if algo == "prune":
        assert r.best.encoding == (
            "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|"
            "nor_conv_3x3~2|"
        )
    darts = get_space("darts")
    sep = Scorer(lambda a: {"good": float(darts.encode(a).count("sep"))}, ["good"], DIRECTIONS)
    r = run_search(algo, darts, sep, budget=30, seed=0)
    darts.decode(r.best.encoding)


def test_progress_bar(capsys):
    import io

    buf = io.StringIO()
    random_search(ToySpace(), scorer(), budget=5, seed=0, progress=buf)
    out = buf.getvalue()
    assert "5/5" in out and "eval/s" in out and "best" in out and out.endswith("\n")


def test_nb201_prune_scores_supernets_like_te_nas():
    """NB201 pruning scores supernets (edges averaging their remaining ops), from the
    full supernet without ``none`` (TE-NAS masks it before round 1): 54 of them, and the
    final arch has no ``none``."""
    from fastntk.spaces import nb201
    from fastntk.spaces.registry import get_space

    space = get_space("nb201")
    seen = []

    def fn(a):
        seen.append(a)
        return {"good": float(a.count("nor_conv_1x1")) - 0.1 * a.count("avg_pool_3x3")}

    r = run_search("prune", space, Scorer(fn, ["good"], DIRECTIONS), budget=200, seed=0)
    supernets = [a for a in seen if nb201.SUPER_SEP in a]
    assert len(supernets) == 6 * (4 + 3 + 2)
    assert r.best.encoding == nb201.format_arch(["nor_conv_1x1"] * 6)
    # the first round starts from the full supernet (no none) minus one op
    assert all(len(e) >= 3 for e in nb201.parse_supernet(supernets[0]))
    assert not any("none" in e for a in supernets for e in nb201.parse_supernet(a))
    no_none = [o for o in nb201.OPS if o != "none"]
    assert space.full_supernet() == nb201.format_supernet([no_none] * 6)


def test_supernet_strings_build_and_round_trip():
    import torch

    from fastntk.spaces import nb201

    ops = [
        nb201.OPS,
        ("skip_connect",),
        ("nor_conv_1x1", "none"),
        nb201.OPS[:2],
        ("avg_pool_3x3",),
        nb201.OPS,
    ]
    s = nb201.format_supernet(ops)
    assert [set(e) for e in nb201.parse_supernet(s)] == [set(e) for e in ops]
    space = nb201.NB201Space(C=4, N=1)
    assert space.decode(space.encode(s)) == s
    feats, logits = space.build(s)(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10)
    with pytest.raises(ArchitectureError):
        nb201.format_supernet([("conv",)] * 6)


def test_search_arguments_checked():
    space = ToySpace()
    for bad in (None, "abc", 1.5, True):
        with pytest.raises(OptionError, match="seed must be an int"):
            random_search(space, scorer(), budget=2, seed=bad)
    with pytest.raises(OptionError, match="budget"):
        random_search(space, scorer(), budget=True)
    with pytest.raises(OptionError, match="population_size must be an int"):
        regularized_evolution(space, scorer(), budget=2, population_size=2.5, sample_size=1)
    lacking = Scorer(lambda a: {"other": 1.0}, ["good"], DIRECTIONS)
    with pytest.raises(OptionError, match="returned no good"):
        random_search(space, lacking, budget=1)


def test_space_configuration_is_part_of_the_journal_key(tmp_path):
    """Two configurations of one space (same name, same arch strings) never share journal
    rows; the default configuration keeps the bare name, so old journals stay valid."""
    from fastntk.search import space_key
    from fastntk.spaces.darts import DartsSpace
    from fastntk.spaces.nb201 import NB201Space
    from fastntk.spaces.registry import get_space

    assert space_key(get_space("nb201")) == space_key(NB201Space(C=16, N=5)) == "nb201"
    assert space_key(get_space("nb201", C=8)) == "nb201(C=8)"
    assert space_key(NB201Space(N=1, C=4)) == "nb201(C=4,N=1)"
    assert space_key(DartsSpace(layers=2)) == "darts(layers=2)"
    assert space_key(get_space("resnet")) == "resnet" and space_key(ToySpace()) == "toy"

    def config_scorer(space):  # the "network" depends on the configuration, like C and N
        return Scorer(
            lambda a: {"good": objective(a) + 100 * (space.opts != "abcde")}, ["good"], DIRECTIONS
        )

    db = tmp_path / "j.db"
    wide, other = ToySpace(), ToySpace(opts="edcba")
    with Journal(db) as j:
        r1 = random_search(wide, config_scorer(wide), budget=5, seed=0, journal=j)
        r2 = random_search(other, config_scorer(other), budget=5, seed=0, journal=j)
        assert {r["space"] for r in j.rows()} == {"toy", "toy(opts='edcba')"}
    assert r1.n_computed == 5 and r2.n_computed == 5  # not served the other one's scores
    assert all(e.metrics["good"] >= 100 for e in r2.history)
    assert r1.space == "toy" and r2.space == "toy(opts='edcba')"


def _supernet_fn():
    from fastntk.spaces import nb201

    w = {"none": 0, "skip_connect": 1, "avg_pool_3x3": 2, "nor_conv_1x1": 3, "nor_conv_3x3": 4}

    def fn(a):  # an additive fake score of a supernet (no NTK): conv3x3 best on every edge
        g = sum(sum(w[o] for o in ops) + 0.1 * e for e, ops in enumerate(nb201.parse_supernet(a)))
        return {"good": g, "good3": g**3}

    return fn


def test_prune_budget_ending_mid_round_uses_only_complete_rounds():
    """The final arch takes, per decision, the best op of the last complete round; an
    unfinished round (its scores come from a partial set: Borda counts over fewer archs)
    decides nothing, and no decision falls back to a fixed op ('none' on NB201)."""
    from fastntk.spaces import nb201
    from fastntk.spaces.registry import get_space

    space, fn = get_space("nb201"), _supernet_fn()
    dirs = {"good": True, "good3": True}
    one = prune_search(space, Scorer(fn, ["good"], dirs), budget=33, seed=0)
    two = prune_search(space, Scorer(fn, ["good", "good3"], dirs), budget=33, seed=0)
    assert one.best.encoding == two.best.encoding == nb201.format_arch(["nor_conv_3x3"] * 6)
    assert one.extra["partial_round"] == 8 and len(one.extra["rounds"]) == 1
    # per-op pruning (toy space), Borda of two metrics that rank alike == the single metric
    toy = ToySpace()
    s1 = Scorer(lambda a: {"good": objective(a), "good3": objective(a) ** 3}, ["good"], dirs)
    s2 = Scorer(s1.fn, ["good", "good3"], dirs)
    for budget in (37, 50, 61):
        assert (
            prune_search(toy, s1, budget=budget, seed=0).best.encoding
            == prune_search(toy, s2, budget=budget, seed=0).best.encoding
            == "eeeeee"
        )
    # no complete round: the ops are drawn (seeded), not choice 0 on every unscored edge
    finals = [prune_search(space, Scorer(fn, ["good"], dirs), budget=10, seed=s) for s in range(3)]
    for r in finals:
        assert r.extra["rounds"] == [] and r.extra["partial_round"] == 9
        assert "none" not in nb201.parse_arch(r.best.encoding)
    again = prune_search(space, Scorer(fn, ["good"], dirs), budget=10, seed=0)
    assert again.best.encoding == finals[0].best.encoding


def test_prune_progress_labels_supernets_and_the_final_arch():
    import io

    from fastntk.spaces.registry import get_space

    buf = io.StringIO()
    prune_search(
        get_space("nb201"),
        Scorer(_supernet_fn(), ["good"], {"good": True}),
        budget=40,
        seed=0,
        progress=buf,
    )
    frames = [f for f in buf.getvalue().replace("\n", "\r").split("\r") if f.strip()]
    assert all("best supernet:" in f for f in frames[:-1])
    assert "final arch (round 2 unfinished, its 15 evaluations unused" in frames[-1]
    assert "best supernet" not in frames[-1]


def test_prune_samples_per_op_refused_where_it_has_no_effect():
    from fastntk.spaces.registry import get_space

    with pytest.raises(OptionError, match="samples_per_op applies to per-op pruning"):
        prune_search(
            get_space("nb201"),
            Scorer(_supernet_fn(), ["good"], {"good": True}),
            budget=5,
            samples_per_op=3,
        )
    r = prune_search(ToySpace(), scorer(), budget=200, seed=0, samples_per_op=2)
    assert len(r.history) == 2 * (30 + 24 + 18 + 12) + 1


def test_scorer_deduplicates_metric_names():
    assert Scorer(toy_metrics, "good, good,bad", DIRECTIONS).metrics == ["good", "bad"]
    # any iterable of names (dict keys, generators), as before the names were checked
    assert Scorer(toy_metrics, {"good": 1, "bad": 2}.keys(), DIRECTIONS).metrics == ["good", "bad"]
    assert Scorer(toy_metrics, (m for m in ["bad", "bad"]), DIRECTIONS).metrics == ["bad"]
    a = reinforce(ToySpace(), Scorer(toy_metrics, "good", DIRECTIONS), budget=40, seed=0)
    b = reinforce(ToySpace(), Scorer(toy_metrics, ["good", "good"], DIRECTIONS), budget=40, seed=0)
    assert a.encodings == b.encodings and a.extra["rewards"] == b.extra["rewards"]


@pytest.mark.parametrize(
    "case",
    [
        "lr=inf",
        "lr=str",
        "baseline_decay=str",
        "time_budget=str",
        "time_budget=inf",
        "journal=str",
        "value=str",
        "value=None",
        "metrics=None",
        "progress=1",
        "max_tries=0",
    ],
)
def test_python_api_errors_are_typed(case, tmp_path):
    space = ToySpace()
    calls = {
        "lr=inf": lambda: reinforce(space, scorer(), budget=5, lr=math.inf),
        "lr=str": lambda: reinforce(space, scorer(), budget=5, lr="0.1"),
        "baseline_decay=str": lambda: reinforce(space, scorer(), budget=5, baseline_decay="x"),
        "time_budget=str": lambda: random_search(space, scorer(), time_budget="10"),
        "time_budget=inf": lambda: random_search(space, scorer(), time_budget=math.inf),
        "journal=str": lambda: random_search(
            space, scorer(), budget=2, journal=str(tmp_path / "runs.db")
        ),
        "value=str": lambda: random_search(
            space, Scorer(lambda a: {"good": "abc"}, ["good"], DIRECTIONS), budget=2
        ),
        "value=None": lambda: random_search(
            space, Scorer(lambda a: {"good": None}, ["good"], DIRECTIONS), budget=2
        ),
        "metrics=None": lambda: Scorer(toy_metrics, None, DIRECTIONS),
        "progress=1": lambda: random_search(space, scorer(), budget=2, progress=1),
        "max_tries=0": lambda: random_search(space, scorer(), budget=2, max_tries=0),
    }
    needles = {
        "value=str": "metric 'good'",
        "value=None": "metric 'good'",
        "journal=str": "Journal\\(path\\)",
    }
    with pytest.raises(OptionError, match=needles.get(case)):
        calls[case]()
    assert not (tmp_path / "runs.db").exists()


def test_numpy_integer_seeds_and_sizes():
    np = pytest.importorskip("numpy")
    for algo in ALGORITHMS:
        a = run_search(algo, ToySpace(), scorer(), budget=12, seed=3)
        b = run_search(algo, ToySpace(), scorer(), budget=np.int64(12), seed=np.int64(3))
        assert a.encodings == b.encodings and b.seed == 3 and type(b.seed) is int
    r = regularized_evolution(
        ToySpace(), scorer(), budget=6, population_size=np.int32(3), sample_size=np.int8(2)
    )
    assert len(r.population) == 3


def test_scorer_keys_on_revised_metrics():
    """A journal used from Python keys on the revisions of revised metrics too (only the
    CLI's settings had them: a journal written before S_e/S_g's revision served its
    values as today's; helper-27)."""
    from fastntk.metrics import DIRECTIONS as D
    from fastntk.metrics import REVISIONS

    s = Scorer(lambda a: {}, ["lga", "generalization"], D)
    assert s.settings == {"metrics": ["lga", "generalization"],
                          "revisions": {"generalization": REVISIONS["generalization"]}}  # fmt: skip
    assert "revisions" not in Scorer(lambda a: {}, ["lga"], D).settings
    own = Scorer(
        lambda a: {}, ["expressivity"], D, settings={"metrics": ["expressivity"], "seed": 3}
    )
    assert (
        own.settings["revisions"] == {"expressivity": REVISIONS["expressivity"]}
        and own.settings["seed"] == 3
    )
