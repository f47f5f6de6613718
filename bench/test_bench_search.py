"""The searches' own bookkeeping: what an evaluation costs beyond scoring it.

REA's tournaments and REINFORCE's rewards rank each candidate among every evaluation so
far (a Borda count over four metrics, :class:`fastntk.metrics.ranking.RunningBorda`); on
NAS-Bench-201 with a scorer that costs nothing (the four values drawn from a hash of the
encoding), a search of 1,000 and one of 8,000 evaluations. The bookkeeping is linear in
the search's length where the time per evaluation (``extra_info["us_per_eval"]``: the
fastest round over the budget) is about the same at both budgets; re-ranking the whole
history at each evaluation makes the longer search cost about eight times more per
evaluation.
"""

from __future__ import annotations

import hashlib

import pytest

from fastntk.search import Scorer, run_search
from fastntk.spaces import nb201

METRICS = ("lga", "feature_entropy", "block_trainability", "num_params")
CASES = [(algo, budget) for algo in ("rea", "reinforce") for budget in (1000, 8000)]


def free_metrics(arch) -> dict[str, float]:
    """Four values from a hash of the architecture: repeatable, ties included."""
    h = hashlib.sha256(nb201.NB201Space().encode(arch).encode()).digest()
    return {m: float(h[i] % 61) for i, m in enumerate(METRICS)}


@pytest.mark.parametrize(("algo", "budget"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_search_bookkeeping(benchmark, algo: str, budget: int) -> None:
    space = nb201.NB201Space()
    scorer = Scorer(free_metrics, list(METRICS), {m: True for m in METRICS})
    benchmark.group = f"search bookkeeping {algo}"
    benchmark.extra_info.update(algo=algo, budget=budget)

    def search():
        return run_search(algo, space, scorer, budget=budget, seed=0)

    result = benchmark.pedantic(search, rounds=3 if benchmark.enabled else 1, iterations=1)
    assert len(result.history) == budget and result.stop_reason == "budget"
    if benchmark.enabled:
        benchmark.extra_info["us_per_eval"] = round(1e6 * benchmark.stats.stats.min / budget, 1)
