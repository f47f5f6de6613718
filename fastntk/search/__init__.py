"""Training-free architecture search: algorithms, scorers and the evaluation journal.

``from fastntk.search import run_search, Scorer, Journal``; see
:mod:`fastntk.search.algorithms` (the four searches), :mod:`fastntk.search.runner` (the
budgets, cache, history and progress they share), :mod:`fastntk.search.scorer` (fitness)
and :mod:`fastntk.search.journal`.
"""

from fastntk.metrics.ranking import borda_scores
from fastntk.search.algorithms import (
    ALGORITHMS,
    categorical,
    prune_search,
    random_search,
    regularized_evolution,
    reinforce,
    run_search,
)
from fastntk.search.journal import Journal, JournalError, settings_key, space_key
from fastntk.search.runner import Evaluation, SearchResult
from fastntk.search.scorer import Scorer
from fastntk.search.scoring import space_scorer

__all__ = [
    "ALGORITHMS",
    "Evaluation",
    "Journal",
    "JournalError",
    "Scorer",
    "SearchResult",
    "borda_scores",
    "categorical",
    "prune_search",
    "random_search",
    "regularized_evolution",
    "reinforce",
    "run_search",
    "settings_key",
    "space_key",
    "space_scorer",
]
