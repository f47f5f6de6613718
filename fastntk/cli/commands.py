"""The ``score``, ``search`` and ``evaluate`` commands: each takes the parsed arguments
(:func:`fastntk.cli.args.parser`) and returns the exit status; a user's error is raised
as a :class:`~fastntk.errors.FastNTKError` (one line on stderr, status 2: :mod:`fastntk.cli`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

from fastntk.errors import OptionError

__all__ = ["COMMANDS", "evaluate", "score", "search"]

NB201_DATASETS = (
    ("cifar10", "CIFAR-10"),
    ("cifar100", "CIFAR-100"),
    ("imagenet16-120", "ImageNet16-120"),
)


def _expand_metrics(spec: str | None) -> list[str]:
    """Metric names of a comma-separated spec (groups expanded); None: the NAS default."""
    from fastntk import metrics as M

    return M.expand_metrics(M.NAS_METRICS if spec is None else spec)


def _scorer(space, metrics: list[str], args, quiet: bool = False):
    """The scorer of a command's options; a note on stderr for each metric that the
    measured evidence shows to rank backwards (or barely) in the chosen BN mode."""
    from fastntk import metrics as M
    from fastntk.search.scoring import notes, space_scorer

    bn = args.bn or M.NAS["bn"]
    for line in [] if quiet else notes(metrics, bn):
        print(f"fastntk {args.command}: note: {line}", file=sys.stderr)
    return space_scorer(space, metrics, data=args.data, batch_size=args.batch_size, bn=bn,
                        seed=args.seed, dtype=args.dtype, lga_epochs=args.lga_epochs,
                        lga_train=args.lga_train, lga_batch=args.lga_batch,
                        supernet_weights=getattr(args, "algo", None) == "prune")  # fmt: skip


def _ranked_scorer(space, metrics: list[str], args):
    """(the scorer the command runs with, or None on a worker rank that has served the
    command and is done). Under torchrun with several ranks (``--workers``), rank 0
    scores over every rank (:mod:`fastntk.search.workers`); the others serve it."""
    from fastntk.search import workers

    if not workers.ranked():
        return _scorer(space, metrics, args)
    if int(os.environ["RANK"]) != 0:
        workers.serve(workers.timed(_scorer(space, metrics, args, quiet=True)))
        return None
    return workers.ParallelScorer(_scorer(space, metrics, args))


def _is_supernet(space, enc: str) -> bool:
    from fastntk.spaces import nb201

    return hasattr(space, "full_supernet") and nb201.SUPER_SEP in enc


def _nb201_truth(arch: str) -> list[str]:
    from fastntk.spaces import nb201

    accs = "  ".join(f"{label} {nb201.accuracy(arch, d):.2f}%" for d, label in NB201_DATASETS)
    lines = [f"  true accuracy (200 epochs): {accs}"]
    for d, label in NB201_DATASETS:
        lines.append(
            f"  {label}: rank {nb201.rank(arch, d)} of {nb201.NUM_ARCHS} "
            f"(better than {nb201.percentile(arch, d):.2f}% of the space)"
        )
    return lines


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def score(args: argparse.Namespace) -> int:
    """``fastntk score``: the metrics of one architecture (and its NB201 accuracy)."""
    from fastntk.spaces.registry import get_space

    space = get_space(args.space)
    metrics = _expand_metrics(args.metric)
    arch = space.decode(args.arch)
    enc = space.encode(arch)
    t = time.perf_counter()
    scorer = _scorer(space, metrics, args)
    values = scorer(arch)
    dt = time.perf_counter() - t
    print(f"space {space.name}  arch {enc}")
    print(
        f"data {args.data}, batch {args.batch_size}, bn {scorer.settings['bn']}, seed {args.seed}"
    )
    width = max(len(m) for m in metrics)
    for m in metrics:
        print(f"  {m:<{width}}  {_fmt(values[m])}")
    if _is_supernet(space, enc):
        print("a supernet (several ops on an edge): NAS-Bench-201 holds no accuracy for it")
    elif space.name == "nb201":
        print("\n".join(_nb201_truth(enc)))
    print(f"time {dt:.2f} s")
    return 0


# Each algorithm's own options and their defaults (None in the parser: given or not).
_ALGO_OPTIONS = {"rea": {"population": 20, "sample_size": 5}, "reinforce": {"lr": 0.2},
                 "prune": {"samples_per_op": 1}}  # fmt: skip


def _algo_options(args) -> None:
    """Fill in the defaults of the algorithm's options; a note on stderr for an option
    another algorithm takes (ignored) and for an REA population that the budget never gets
    past (no mutation: random search).

    REA's default population is 20 (measured: ``bench/results/nb201_search.md``, budget
    100), or a fifth of a smaller budget (at least 2), so that a short search mutates too,
    and never smaller than a given ``--sample-size`` (a tournament draws from it); its
    default tournament is 5, or the whole population where that is smaller."""
    # the note below is for a population the user chose: given, or raised to --sample-size
    # (not the floor of 2 that a budget of 1 or 2 meets anyway)
    given = "--population" if args.population is not None else None
    if args.algo == "rea" and args.population is None:
        derived = _ALGO_OPTIONS["rea"]["population"]
        if args.budget is not None:
            derived = max(2, min(derived, args.budget // 5))
        if args.sample_size is not None and args.sample_size > derived:
            derived, given = args.sample_size, "the population (--sample-size)"
        args.population = derived
    if args.algo == "rea" and args.sample_size is None and args.population is not None:
        args.sample_size = min(_ALGO_OPTIONS["rea"]["sample_size"], args.population)
    for algo, opts in _ALGO_OPTIONS.items():
        for name, default in opts.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
            elif algo != args.algo:
                flag = "--" + name.replace("_", "-")
                print(
                    f"fastntk search: note: {flag} is an option of --algo {algo}; "
                    f"--algo {args.algo} does not use it",
                    file=sys.stderr,
                )
    if args.algo == "rea" and given and args.budget is not None and args.population >= args.budget:
        print(
            f"fastntk search: note: {given} {args.population} >= --budget "
            f"{args.budget}: REA samples its whole budget at random and never mutates",
            file=sys.stderr,
        )


def search(args: argparse.Namespace) -> int:
    """``fastntk search``: a training-free search; the best architecture found."""
    from fastntk.search import ALGORITHMS, Journal, run_search
    from fastntk.spaces.registry import get_space

    if args.algo not in ALGORITHMS:
        raise OptionError(f"unknown search algorithm {args.algo!r}; known: {', '.join(ALGORITHMS)}")
    if args.budget is None and args.time_budget is None:
        raise OptionError("give --budget N (evaluations) and/or --time-budget SECONDS")
    space = get_space(args.space)
    metrics = _expand_metrics(args.metric)
    _algo_options(args)
    if args.algo == "rea" and args.sample_size > args.population:
        raise OptionError(
            f"--sample-size ({args.sample_size}) must be <= --population ({args.population})"
        )
    scorer = _ranked_scorer(space, metrics, args)
    if scorer is None:  # a worker rank: done
        return 0
    journal = None
    kw: dict[str, Any] = {}
    if args.algo == "rea":
        kw = {"population_size": args.population, "sample_size": args.sample_size}
    elif args.algo == "reinforce":
        kw = {"lr": args.lr}
    elif args.algo == "prune":
        kw = {"samples_per_op": args.samples_per_op}
    try:
        journal = Journal(args.db) if args.db is not None else None
        res = run_search(
            args.algo,
            space,
            scorer,
            budget=args.budget,
            time_budget=args.time_budget,
            seed=args.seed,
            journal=journal,
            progress=args.progress,
            **kw,
        )
    finally:
        if journal is not None:
            journal.close()
        if hasattr(scorer, "close"):  # (the workers wait for rank 0's word)
            scorer.close()
    print(
        f"search {args.algo} on {space.name}: {res.n_evaluations} evaluations "
        f"({res.n_computed} computed, {res.n_cached} from the journal/cache) in "
        f"{res.elapsed:.1f} s, stopped: {res.stop_reason}"
    )
    if res.best is None:
        print("no architecture evaluated")
        return 0
    print(f"best {res.best.encoding}")
    if res.extra.get("note"):  # prune stopped inside a round (the budget)
        print(f"  pruning unfinished: {res.extra['note']}")
    print("  " + "  ".join(f"{m}={_fmt(v)}" for m, v in res.best.metrics.items()))
    if space.name == "nb201":
        print("\n".join(_nb201_truth(res.best.encoding)))
    if args.db is not None:
        print(f"journal {args.db}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``fastntk evaluate``: Kendall τ and Spearman ρ of each metric (and their Borda
    count) with NB201 accuracy over sampled architectures; optionally a scatter plot."""
    import numpy as np
    from scipy import stats

    from fastntk.cli import plot
    from fastntk.metrics import DIRECTIONS
    from fastntk.search import Journal, random_search
    from fastntk.spaces.registry import get_space

    space = get_space(args.space)
    if space.name != "nb201":
        raise OptionError(
            f"evaluate needs ground-truth accuracies, which only the nb201 space "
            f"has (got {space.name!r})"
        )
    from fastntk.spaces import nb201

    nb201.accuracy(nb201.BENCH_ARCH, args.dataset)  # OptionError on an unknown data set
    if args.plot:  # before the evaluations, not after them
        plot.require()
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise OptionError(f"cannot write --plot {args.plot!r}: {folder} is not a writable "
                              "folder")  # fmt: skip
    metrics = _expand_metrics(args.metric)
    scorer = _ranked_scorer(space, metrics, args)
    if scorer is None:  # a worker rank: done
        return 0
    journal = None
    try:
        journal = Journal(args.db) if args.db is not None else None
        res = random_search(
            space,
            scorer,
            budget=args.archs,
            seed=args.seed,
            journal=journal,
            progress=args.progress,
        )
    finally:
        if journal is not None:
            journal.close()
        if hasattr(scorer, "close"):  # (the workers wait for rank 0's word)
            scorer.close()
    archs = res.encodings
    acc = np.array([nb201.accuracy(a, args.dataset) for a in archs])
    rows = []
    cols: list[tuple[str, list[float]]] = []
    for m in metrics:
        sign = 1.0 if DIRECTIONS[m] else -1.0
        vals = []
        for e in res.history:
            v = e.metrics[m]
            vals.append(-math.inf if math.isnan(v) else sign * v)
        cols.append((m, vals))
    if len(metrics) > 1:
        cols.append(("borda", scorer.fitness([e.metrics for e in res.history])))
    print(
        f"{len(archs)} NB201 archs, ground truth {args.dataset}; metrics oriented so that "
        "higher predicts better (lower-is-better metrics negated; undefined values rank "
        "last)"
    )
    print(f"  {'metric':<16} {'kendall_tau':>11} {'spearman_rho':>12}")
    for name, vals in cols:
        r = stats.rankdata(np.asarray(vals, dtype=float))
        if len(archs) < 2 or np.all(r == r[0]):
            tau = rho = float("nan")
        else:
            tau = float(stats.kendalltau(r, acc).statistic)
            rho = float(stats.spearmanr(r, acc).statistic)
        rows.append((name, tau, rho))
        print(f"  {name:<16} {tau:>11.4f} {rho:>12.4f}")
    if args.plot:  # the last column: the Borda count, or the one metric
        name, vals = cols[-1]
        if name == "borda":
            what = xlabel = f"Borda({', '.join(metrics)})"
        elif DIRECTIONS[name]:
            what = xlabel = name
        else:
            name = what = f"-{name}"  # the plotted values are negated (oriented)
            xlabel = f"{name} (negated: lower {name[1:]} predicts better)"
        xs = np.asarray(vals, dtype=float)
        plot.scatter(args.plot, xs, acc, xlabel=xlabel,
                     ylabel=f"{args.dataset} test accuracy (%)",
                     title=f"{what} vs {args.dataset} accuracy\n"
                           f"{len(archs)} NB201 archs, Kendall τ {rows[-1][1]:.4f}")  # fmt: skip
        fin = xs[np.isfinite(xs)]
        xr = f"{fin.min():.4g}..{fin.max():.4g}" if fin.size else "-"
        print(
            f"plot {args.plot} (x: {name} {xr}, y: {args.dataset} accuracy "
            f"{acc.min():.2f}..{acc.max():.2f}%)"
        )
    return 0


COMMANDS = {"score": score, "search": search, "evaluate": evaluate}
