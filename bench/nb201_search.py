"""What each search algorithm returns on NAS-Bench-201 with the default NAS score.

Evidence script (not a CI test). For each algorithm (random, REA, prune, REINFORCE) and
each search seed, one search of ``--budget`` evaluations with the default score
(``fastntk.metrics.NAS_METRICS``, or the Borda count of ``--metric``; under the preset ``NAS``, scored by
``fastntk.search.scoring.space_scorer`` with data and weight seed 0, as ``fastntk search``
scores them); the returned architecture's true 200-epoch accuracy and percentile on
CIFAR-10, CIFAR-100 and ImageNet16-120. Next to them: random search judged by the true
CIFAR-10 accuracy with the same budget (an oracle with the same number of queries), and
the best of the space.

Scores are looked up, by isomorphism class, in the whole-space journals
(``bench/results/nb201_space.csv`` and ``nb201_features.csv``, per-sample rows) and otherwise computed and kept in
this script's own score journal (``--scores``; apart from the whole-space CSV, whose rows
must stay a uniform sample of the space). Pruning scores supernets, which are computed and
kept there too. One result row per (algorithm, seed) is appended to ``--out`` as soon as
its search ends; a rerun skips the rows it holds.

    python bench/nb201_search.py --seeds 10 --budget 100
    python bench/nb201_search.py --seeds 10 --budget 100 --metric lga,feature_entropy,num_params
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from _meta import git_sha  # noqa: E402

from fastntk import metrics as M  # noqa: E402
from fastntk.search import Scorer, run_search  # noqa: E402
from fastntk.search.scoring import space_scorer  # noqa: E402
from fastntk.spaces import nb201  # noqa: E402

DATASETS = (
    ("cifar10", "CIFAR-10"),
    ("cifar100", "CIFAR-100"),
    ("imagenet16-120", "ImageNet16-120"),
)
ALGOS = ("random", "rea", "prune", "reinforce")
FIELDS = ("algo", "seed", "budget", "arch", *(f"acc_{d}" for d, _ in DATASETS),
          *(f"pct_{d}" for d, _ in DATASETS), "computed", "seconds", "commit")  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--seeds", type=int, default=10, help="search seeds 0..S-1")
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--space-csv", action="append",
                    help="whole-space journals to look scores up in, merged by architecture "
                    "(repeat it; default: results/nb201_space.csv, nb201_features.csv and "
                    "nb201_az.csv)")  # fmt: skip
    ap.add_argument("--scores", help="the score journal (default: results/"
                    "nb201_search_scores_<metrics>.csv, one per default score)")  # fmt: skip
    ap.add_argument("--metric", help="the score's metrics or group, comma separated "
                    "(default: the default score, fastntk.metrics.NAS_METRICS)")  # fmt: skip
    ap.add_argument("--out", help="result journal (default: results/nb201_search.csv for the "
                    "default score, else results/nb201_search_<metrics>.csv)")  # fmt: skip
    ap.add_argument("--summary-only", action="store_true")
    return ap.parse_args(argv)


def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class CachedScores:
    """``fn(arch)`` of the default scorer, answered from the journals where it can be."""

    def __init__(self, space, scorer: Scorer, space_csvs: list[str], scores_csv: str):
        self.space, self.scorer, self.path, self.computed = space, scorer, scores_csv, 0
        names = scorer.metrics
        table: dict[str, dict[str, float]] = {}
        for path in space_csvs:  # each journal holds some of the metrics
            for r in _rows(path):
                if (r["bn"] == scorer.settings["bn"] and r["params_set"] == "all"
                        and r["seed"] == "0" and r["batch_size"] == "64"
                        and r["dtype"] == "float32"):  # fmt: skip
                    table.setdefault(r["arch"], {}).update(
                        {m: float(r[m]) for m in names if m in r}
                    )
        self.table = {a: v for a, v in table.items() if len(v) == len(names)}
        self.own = {r["encoding"]: {m: float(r[m]) for m in names} for r in _rows(scores_csv)}
        self.fields = ("encoding", *names)

    def __call__(self, arch) -> dict[str, float]:
        enc = self.space.encode(arch)
        key = enc if nb201.SUPER_SEP in enc else nb201.canonical(enc)
        hit = self.table.get(key) or self.own.get(key)
        if hit is not None:
            return hit
        # the class's canonical member is scored, as the whole-space run scores it
        vals = self.scorer.fn(key)
        self.own[key] = {m: float(vals[m]) for m in self.scorer.metrics}
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow({"encoding": key, **self.own[key]})
        self.computed += 1
        return self.own[key]


def search(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    space = nb201.NB201Space()
    done = {(r["algo"], r["seed"]) for r in _rows(args.out)}
    commit = git_sha()
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        # one score cache for every algorithm (pruning's supernets take the full supernet's
        # weights, as the CLI's pruning does; architectures are scored alike everywhere)
        base = space_scorer(space, args.metrics, supernet_weights=True)
        scores = args.scores or os.path.join(
            HERE, "results", f"nb201_search_scores_{'_'.join(base.metrics)}.csv"
        )
        space_csvs = args.space_csv or [os.path.join(HERE, "results", f"nb201_{name}.csv")
                                        for name in ("space", "features", "az")]  # fmt: skip
        cache = CachedScores(space, base, space_csvs, scores)
        scorer = Scorer(cache, base.metrics, base.directions, settings=base.settings)
        for seed in range(args.seeds):  # seeds outside: a stopped run covers every algorithm
            for algo in args.algos.split(","):
                if (algo, str(seed)) in done:
                    continue
                t = time.monotonic()
                before = cache.computed
                res = run_search(algo, space, scorer, budget=args.budget, seed=seed)
                arch = res.best.encoding
                row = {"algo": algo, "seed": seed, "budget": args.budget, "arch": arch,
                       "computed": cache.computed - before,
                       "seconds": f"{time.monotonic() - t:.1f}", "commit": commit}  # fmt: skip
                for d, _ in DATASETS:
                    row[f"acc_{d}"] = nb201.accuracy(arch, d)
                    row[f"pct_{d}"] = f"{nb201.percentile(arch, d):.2f}"
                w.writerow(row)
                f.flush()
                print(f"{algo} seed {seed}: {arch} CIFAR-10 {row['acc_cifar10']:.2f}% "
                      f"(top {100 - float(row['pct_cifar10']):.1f}%), {row['computed']} "
                      f"computed, {row['seconds']} s", flush=True)  # fmt: skip


def oracle_random(budget: int, seeds: int) -> list[str]:
    """Random search judged by the true CIFAR-10 accuracy: the best of ``budget`` draws."""
    archs = nb201.all_archs()
    out = []
    for s in range(seeds):
        draw = random.Random(s).sample(archs, budget)
        out.append(max(draw, key=lambda a: nb201.accuracy(a, "cifar10")))
    return out


def summarise(args) -> str:
    rows = _rows(args.out)
    default = args.metrics == list(M.NAS_METRICS)
    which = "default score" if default else f"Borda({', '.join(args.metrics)})"
    lines = [
        f"## Search on NAS-Bench-201 with {'the ' if default else ''}{which}",
        "",
        f"{'Default score' if default else 'Score'}: Borda({', '.join(args.metrics)}) under "
        f"bn={M.NAS['bn']}, 64 bundled "
        f"CIFAR-10 images, data and weight seed 0; search seeds 0..{args.seeds - 1}, budget "
        f"{args.budget} evaluations. The returned architecture's 200-epoch test accuracy, "
        "mean ± sd over seeds (top-% = share of the 15,625 architectures at least as good). "
        f"Command: `python bench/nb201_search.py {' '.join(sys.argv[1:])}`, machine "
        f"{platform.machine()}, {os.cpu_count()} CPUs, summary at commit {git_sha()}, "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| algorithm | seeds | "
        + " | ".join(f"{lab} acc | {lab} top-%" for _, lab in DATASETS)
        + " |",
        "|---|---|" + "---|---|" * len(DATASETS),
    ]

    def line(name, archs):
        cells = []
        for d, _ in DATASETS:
            acc = np.array([nb201.accuracy(a, d) for a in archs])
            top = 100 - nb201.percentiles(archs, d)
            cells.append(f"{acc.mean():.2f} ± {acc.std():.2f} | {top.mean():.1f} ± {top.std():.1f}")
        lines.append(f"| {name} | {len(archs)} | " + " | ".join(cells) + " |")

    for algo in ALGOS:
        archs = [r["arch"] for r in rows if r["algo"] == algo and r["budget"] == str(args.budget)]
        if archs:
            line(f"{algo} ({which})", archs)
    line(
        f"random, judged by true CIFAR-10 accuracy ({args.budget} draws)",
        oracle_random(args.budget, args.seeds),
    )
    best = max(nb201.all_archs(), key=lambda a: nb201.accuracy(a, "cifar10"))
    line("best of the space (by CIFAR-10)", [best])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.metrics = M.expand_metrics(args.metric or M.NAS_METRICS)
    if args.out is None:
        tail = "" if args.metrics == list(M.NAS_METRICS) else "_" + "_".join(args.metrics)
        args.out = os.path.join(HERE, "results", f"nb201_search{tail}.csv")
    if not args.summary_only:
        search(args)
    table = summarise(args)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
