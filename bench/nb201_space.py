"""fastntk's metrics on the whole NAS-Bench-201 space: Kendall τ and Spearman ρ per BN mode.

Evidence script (not a CI test). Every one of the 6,466 architectures that are unique up to
isomorphism (``nb201.canonical``) is scored once per BatchNorm mode, with the scorer that
``fastntk score|search|evaluate`` use (``fastntk.search.scoring.space_scorer``: the same
64 bundled CIFAR-10 images, the same seeded weights), and the score is mapped back to all
15,625 architectures of its class. The summary gives, for CIFAR-10, CIFAR-100 and
ImageNet16-120 200-epoch test accuracy, each metric's τ and ρ (oriented by its direction,
undefined values ranked last, as a search ranks them), the parameter count, Borda counts
of metrics, the default NAS score, and published figures on the same space.

The journal is the CSV (``--out``): one row per (architecture, BN mode, setting), appended
and flushed as soon as it is computed; a rerun skips the rows it holds, so the run can be
killed and resumed across sessions. Architectures are taken in a seeded random order, so
the rows done at any time are a uniform random sample of the space and the summary of a
partial run is an unbiased estimate (it says how many classes it covers).

    python bench/nb201_space.py --bn per_sample,eval --threads 1          # runs, resumes
    python bench/nb201_space.py --summary-only                             # table so far
    python bench/nb201_space.py --bn per_sample,eval --metrics feature_entropy \
        --out bench/results/nb201_features.csv         # another metric: its own journal
    python bench/nb201_space.py --bn per_sample --metrics feature_entropy,block_trainability \
        --out bench/results/nb201_az.csv                     # AZ-NAS's two proxies
    python bench/nb201_space.py --summary-only --bn per_sample,eval \
        --join bench/results/nb201_features.csv --join bench/results/nb201_az.csv \
        --evidence   # all, + the defaults' evidence file fastntk/data/nas_evidence.json
        # (read by fastntk's notes and tests)
    torchrun --standalone --nproc-per-node=2 bench/nb201_space.py --bn per_sample --threads 1
        # over ranks (fastntk.search.workers.Pool): rank 0 writes the journal
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import sys
import time

import numpy as np
from scipy import stats

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from _meta import git_sha  # noqa: E402

from fastntk import metrics as M  # noqa: E402
from fastntk.search import workers  # noqa: E402
from fastntk.search.scoring import space_scorer  # noqa: E402
from fastntk.spaces import nb201  # noqa: E402

DATASETS = (
    ("cifar10", "CIFAR-10"),
    ("cifar100", "CIFAR-100"),
    ("imagenet16-120", "ImageNet16-120"),
)
METRICS = ("fnorm", "mean", "ncn", "lga", "trainability", "num_params")
PARAM_SETS = {"all": None, "weights": lambda name, p: "weight" in name}
# Borda counts reported next to the single metrics (the default score among them).
BORDAS = (
    ("ncn", "lga"),
    ("ncn", "num_params"),
    ("lga", "num_params"),
    ("trainability", "num_params"),
    ("ncn", "lga", "num_params"),
    ("ncn", "trainability", "num_params"),
    ("lga", "trainability", "num_params"),
    ("fnorm", "ncn", "lga", "num_params"),
    ("lga_t", "num_params"),  # (the lga_t journal: bench/results/nb201_lga_t.csv)
    ("lga", "lga_t", "num_params"),
    # AZ-NAS's expressivity (the features journal, bench/results/nb201_features.csv, joined)
    ("feature_entropy", "num_params"),
    ("ncn", "feature_entropy", "num_params"),
    ("lga", "feature_entropy", "num_params"),
    ("trainability", "feature_entropy", "num_params"),
    ("ncn", "lga", "feature_entropy", "num_params"),
    ("lga_t", "feature_entropy", "num_params"),  # (the lga_t journal, features joined)
    # AZ-NAS's trainability too (bench/results/nb201_az.csv, joined)
    ("block_trainability", "num_params"),
    ("feature_entropy", "block_trainability", "num_params"),
    ("lga", "block_trainability", "num_params"),
    ("lga", "feature_entropy", "block_trainability", "num_params"),
    ("ncn", "lga", "feature_entropy", "block_trainability", "num_params"),
    ("lga_t", "feature_entropy", "block_trainability", "num_params"),  # (the lga_t journal)
)
# A search keeps the best-scored of its evaluations, so a score is also judged by the top
# end of its ranking: the expected top-% of the best-scored of this many uniform draws
# (``fastntk search``'s default: random search, budget 100).
DRAWS = 100
# Published figures on the same 15,625 architectures (Spearman ρ unless τ is named):
# zero-cost-nas (Abdelfattah et al., ICLR 2021, Table "NAS-Bench-201", all 15,625 archs)
# and AZ-NAS (Lee & Ham, CVPR 2024, NAS-Bench-201 CIFAR-10).
PUBLISHED = (
    ("zero-cost-nas synflow", (0.737, 0.763, 0.751), None),
    ("zero-cost-nas jacob_cov", (0.731, 0.704, 0.701), None),
    ("zero-cost-nas snip", (0.596, None, None), None),
    ("zero-cost-nas grad_norm", (0.594, None, None), None),
    ("zero-cost-nas vote", (0.817, 0.832, 0.813), None),
    ("AZ-NAS", (0.913, None, None), 0.741),
)


def fields(metrics) -> tuple[str, ...]:
    return ("arch", "bn", "params_set", "seed", "batch_size", "dtype", *metrics, "seconds",
            "error", "commit")  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bn", default="per_sample,eval", help="BN modes, comma separated")
    ap.add_argument("--params", default="all", choices=sorted(PARAM_SETS))
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument(
        "--metrics",
        default=",".join(METRICS),
        help="metrics of the journal (another set needs another --out)",
    )
    ap.add_argument("--lga-epochs", type=int, default=1, help="lga_t: training epochs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="seed of the order, data and weights")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, help="stop after this many new rows")
    ap.add_argument("--time-budget", type=float, help="stop after this many seconds")
    ap.add_argument("--summary-only", action="store_true", help="compute nothing")
    ap.add_argument(
        "--evidence",
        action="store_true",
        help="also write fastntk/data/nas_evidence.json from the summary",
    )
    ap.add_argument("--out", default=os.path.join(HERE, "results", "nb201_space.csv"))
    ap.add_argument(
        "--join",
        metavar="CSV",
        action="append",
        default=[],
        help="summary: also the metrics of another journal of the same setting, by "
        "(architecture, BN mode), on the architectures every journal has scored",
    )
    ap.add_argument(
        "--against",
        metavar="CSV",
        help="also compare with another setting's journal (default settings), on the "
        "architectures both have scored",
    )
    return ap.parse_args(argv)


def order(seed: int) -> list[str]:
    """The canonical architectures in the run's seeded order."""
    reps = sorted(set(nb201.canonical(a) for a in nb201.all_archs()))
    random.Random(seed).shuffle(reps)
    return reps


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(args, bns: list[str]) -> None:
    import torch

    torch.set_num_threads(args.threads)
    done = {(r["arch"], r["bn"]) for r in read_rows(args.out) if same_setting(r, args)}
    todo = [(a, bn) for a in order(args.seed) for bn in bns if (a, bn) not in done]
    if args.limit is not None:
        todo = todo[: args.limit]
    space = nb201.NB201Space()
    metrics = args.metrics
    scorers = {bn: space_scorer(space, metrics, bn=bn, seed=args.seed, dtype=args.dtype,
                                batch_size=args.batch_size, lga_epochs=args.lga_epochs)
               for bn in bns}  # fmt: skip
    params = PARAM_SETS[args.params]
    commit = git_sha()
    print(
        f"# {len(todo)} rows to compute ({len(done)} in {args.out}); torch "
        f"{torch.__version__}, {args.threads} threads, commit {commit}",
        flush=True,
    )

    def compute(arch_bn: tuple[str, str]) -> dict:
        return _row(scorers, arch_bn, params, metrics, args, commit)

    pool = None
    if workers.ranked():  # torchrun: rank 0 writes the journal, every rank computes
        if int(os.environ["RANK"]) != 0:
            workers.serve(compute)
            return
        pool = workers.Pool(compute)
    width = 1 if pool is None else pool.width
    new = not os.path.exists(args.out)
    t0 = time.monotonic()
    done_now = 0
    try:
        with open(args.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields(metrics))
            if new:
                w.writeheader()
            for b0 in range(0, len(todo), width):
                if args.time_budget is not None and time.monotonic() - t0 > args.time_budget:
                    print("# time budget reached", flush=True)
                    break
                batch = todo[b0 : b0 + width]
                rows = [compute(a) for a in batch] if pool is None else pool.map(batch)
                for row in rows:
                    w.writerow(row)
                    done_now += 1
                    el = time.monotonic() - t0
                    print(f"[{done_now}/{len(todo)}] {row['bn']:10s} {row['seconds']}s "
                          f"eta {el / done_now * (len(todo) - done_now) / 3600:.1f} h  "
                          + " ".join(f"{m}={float(row[m]):.4g}" for m in metrics[:5])
                          + f" {row['error']}", flush=True)  # fmt: skip
                f.flush()
    finally:
        if pool is not None:
            pool.close()


def _row(scorers, arch_bn, params, metrics, args, commit) -> dict:
    """One journal row: the metrics of ``arch`` in BN mode ``bn`` (or its error)."""
    arch, bn = arch_bn
    t = time.monotonic()
    fn = scorers[bn].fn
    row = {"arch": arch, "bn": bn, "params_set": args.params, "seed": args.seed,
           "batch_size": args.batch_size, "dtype": args.dtype, "error": "",
           "commit": commit}  # fmt: skip
    try:
        if params is None:
            vals = fn(arch)
        else:  # another parameter selection than the scorer's (every parameter)
            vals = _score_with_params(fn, arch, params, metrics, args.dtype)
        row.update({m: vals[m] for m in metrics})
        bad = [m for m in metrics if math.isnan(vals[m])]
        row["error"] = "undefined: " + " ".join(bad) if bad else ""
    except Exception as e:  # one bad architecture must not stop the run
        row.update({m: "nan" for m in metrics})
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    row["seconds"] = f"{time.monotonic() - t:.2f}"
    return row


def _score_with_params(fn, arch, params, metrics, dtype):
    import torch

    from fastntk.search.scoring import arch_seed

    enc = fn.space.encode(arch)
    torch.manual_seed(arch_seed(fn.seed, enc))
    model = fn.space.build(arch, num_classes=fn.num_classes)
    return M.compute_metrics(model, fn.x, fn.y, metrics, bn=fn.bn, params=params,
                             errors="nan", dtype=getattr(torch, dtype), progress=False)  # fmt: skip


def same_setting(r: dict, args) -> bool:
    return (r.get("seed") == str(args.seed) and r.get("batch_size") == str(args.batch_size)
            and r.get("params_set") == args.params and r.get("dtype") == args.dtype)  # fmt: skip


# --------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------


def _oriented(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Higher predicts better; NaN and a metric's own worst infinity rank last, tied."""
    v = np.where(np.isnan(values), -np.inf, values if higher_is_better else -values)
    return stats.rankdata(v)  # -inf entries tie at the bottom


def _borda(table: dict[str, np.ndarray], names) -> np.ndarray:
    return sum(_oriented(table[m], M.DIRECTIONS[m]) for m in names)


def best_of_draws(score: np.ndarray, top: np.ndarray, draws: int = DRAWS) -> float:
    """Expected ``top`` (top-% by true accuracy) of the best-scored of ``draws`` uniform
    draws with replacement, exactly: the best lands in the score group (ties) whose
    members sit at sorted positions [lo, hi) from the top with probability
    ((N - lo) / N)^draws - ((N - hi) / N)^draws, and is uniform within the group."""
    n = len(score)
    order = np.argsort(-score, kind="stable")
    s, t = score[order], top[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], n]
    p = ((n - starts) / n) ** draws - ((n - ends) / n) ** draws
    means = np.add.reduceat(t, starts) / (ends - starts)
    return float(p @ means)


def correlations(rows: list[dict], members: dict[str, list[str]], metrics) -> dict:
    """{score name: {dataset: (tau, rho, top-% of the best of DRAWS draws)}} over every
    architecture of the scored classes."""
    archs = [a for r in rows for a in members[r["arch"]]]
    per_arch = {m: np.array([float(r[m]) for r in rows for _ in members[r["arch"]]])
                for m in metrics}  # fmt: skip
    scores = {m: _oriented(per_arch[m], M.DIRECTIONS[m]) for m in metrics}
    for names in BORDAS:
        if all(m in metrics for m in names):
            scores["borda(" + ", ".join(names) + ")"] = _borda(per_arch, names)
    acc, top = {}, {}
    for d, _ in DATASETS:
        acc[d] = nb201.accuracies(archs, d)
        top[d] = 100.0 - nb201.percentiles(archs, d)  # the share of the space at least as good
    out = {}
    for name, s in scores.items():
        out[name] = {d: (float(stats.kendalltau(s, acc[d]).statistic),
                         float(stats.spearmanr(s, acc[d]).statistic),
                         best_of_draws(s, top[d])) for d, _ in DATASETS}  # fmt: skip
    return out


def joined(args) -> tuple[list[dict], list[str]]:
    """This journal's rows of the setting, with the metrics of every ``--join`` journal
    merged in by (architecture, BN mode); in a BN mode a joined journal has, the rows it
    lacks are left out. Returns the rows and every metric some of them hold (``seconds``
    stays this journal's)."""
    rows = [r for r in read_rows(args.out) if same_setting(r, args)]
    metrics = list(args.metrics)
    for path in args.join:
        other = [r for r in read_rows(path) if same_setting(r, args)]
        if not other:
            raise SystemExit(f"--join {path}: no rows of this setting")
        theirs = [m for m in other[0] if m in M.METRICS and m not in metrics]
        by_key = {(r["arch"], r["bn"]): r for r in other}
        modes = {r["bn"] for r in other}  # (a BN mode it lacks keeps its rows, without them)
        rows = [r if r["bn"] not in modes else
                {**r, **{m: by_key[r["arch"], r["bn"]][m] for m in theirs}}
                for r in rows if r["bn"] not in modes or (r["arch"], r["bn"]) in by_key]  # fmt: skip
        metrics += theirs
    return rows, metrics


def summarise(args, bns: list[str]) -> tuple[str, dict]:
    rows, metrics = joined(args)
    members: dict[str, list[str]] = {}
    for a in nb201.all_archs():
        members.setdefault(nb201.canonical(a), []).append(a)
    default = "borda(" + ", ".join(M.NAS_METRICS) + ")"
    lines = [
        "## fastntk metrics on the whole NAS-Bench-201 space",
        "",
        f"Unique architectures scored once per BN mode (seed {args.seed}, {args.batch_size} "
        f"bundled CIFAR-10 images, {args.dtype} kernels, params={args.params}, the sum-of-logits "
        "kernel, weights from `fastntk.search.scoring.space_scorer`), each score mapped back "
        "to every architecture of its isomorphism class; Kendall τ / Spearman ρ with the "
        "200-epoch test accuracy. Metrics are oriented by their direction (positive: predicts "
        "accuracy); undefined values (a network whose output ignores its input) rank last. "
        f'"Best of {DRAWS}: top-%": the expected share of the space at least as good as the '
        f"best-scored of {DRAWS} uniform draws (what a random search of budget {DRAWS} "
        'returns; exact from the scores, lower is better); "mean top-%" averages it over '
        "the three data sets: the default score is the score with an NTK metric that "
        "minimises it (`tests/test_nas.py`). "
        f"Command: `python bench/nb201_space.py {' '.join(sys.argv[1:])}`, machine: "
        f"{platform.machine()}, {os.cpu_count()} CPUs; summary at commit {git_sha()}, "
        f"{time.strftime('%Y-%m-%d')} (each CSV row names the commit that computed it)."
        + (
            f" The metrics of {', '.join(f'`{os.path.basename(p)}`' for p in args.join)} are "
            "joined by architecture and BN mode; the median time per architecture is this "
            "journal's."
            if args.join
            else ""
        ),
        "",
    ]
    evidence = {"tau": {}, "top": {}, "draws": DRAWS, "n": {}, "default_score": default}
    for bn in bns:
        rs = [r for r in rows if r["bn"] == bn]
        if len(rs) < 3:
            continue
        n_arch = sum(len(members[r["arch"]]) for r in rs)
        secs = np.array([float(r["seconds"]) for r in rs])
        cor = correlations(rs, members, [m for m in metrics if all(m in r for r in rs)])
        lines += [f"### bn={bn}: {len(rs)} of {nb201.NUM_UNIQUE} unique architectures "
                  f"({n_arch} of {nb201.NUM_ARCHS}); median {np.median(secs):.2f} s each", "",
                  "| score | " + " | ".join(f"{lab} τ | {lab} ρ" for _, lab in DATASETS)
                  + " | " + " | ".join(f"{lab} best of {DRAWS}: top-%" for _, lab in DATASETS)
                  + " | mean top-% |",
                  "|---|" + "---|---|" * len(DATASETS) + "---|" * (len(DATASETS) + 1)]  # fmt: skip
        for name, by_d in cor.items():
            label = f"**{name} (default score)**" if name == default else name
            cells = " | ".join(f"{by_d[d][0]:+.3f} | {by_d[d][1]:+.3f}" for d, _ in DATASETS)
            tops = [round(by_d[d][2], 2) for d, _ in DATASETS]
            mean_top = round(float(np.mean(tops)), 2)
            lines.append(f"| {label} | {cells} | {' | '.join(f'{t:.2f}' for t in tops)} "
                         f"| {mean_top:.2f} |")  # fmt: skip
            evidence["top"].setdefault(bn, {})[name] = mean_top
        lines.append("")
        evidence["tau"][bn] = {name: round(by_d["cifar10"][0], 3) for name, by_d in cor.items()}
        evidence["n"][bn] = len(rs)
    if args.against:
        lines += against(args, bns, rows, members)
    lines += ["### Published on the same 15,625 architectures", "",
              "| method | CIFAR-10 ρ | CIFAR-100 ρ | ImageNet16-120 ρ | CIFAR-10 τ |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, rhos, tau in PUBLISHED:
        cells = " | ".join("–" if r is None else f"{r:.3f}" for r in rhos)
        lines.append(f"| {name} | {cells} | {'–' if tau is None else f'{tau:.3f}'} |")
    return "\n".join(lines) + "\n", evidence


def against(args, bns, rows, members) -> list[str]:
    """τ of this setting and of the default setting's journal on the archs both scored."""
    base_args = argparse.Namespace(seed=args.seed, batch_size=args.batch_size, params="all",
                                   dtype="float32")  # fmt: skip
    base = [r for r in read_rows(args.against) if same_setting(r, base_args)]
    lines = []
    for bn in bns:
        mine = {r["arch"]: r for r in rows if r["bn"] == bn}
        theirs = {r["arch"]: r for r in base if r["bn"] == bn}
        common = [a for a in mine if a in theirs]
        if len(common) < 3:
            continue
        cor_m = correlations([mine[a] for a in common], members, args.metrics)
        cor_b = correlations([theirs[a] for a in common], members, args.metrics)
        lines += [f"### bn={bn}: params={args.params}, {args.dtype} against params=all, "
                  f"float32 (`{os.path.basename(args.against)}`), on the {len(common)} unique "
                  "architectures both scored", "",
                  "| score | " + " | ".join(f"{lab} τ (this / default)" for _, lab in DATASETS)
                  + " |", "|---|" + "---|" * len(DATASETS)]  # fmt: skip
        for name in cor_m:
            cells = " | ".join(f"{cor_m[name][d][0]:+.3f} / {cor_b[name][d][0]:+.3f}"
                               for d, _ in DATASETS)  # fmt: skip
            lines.append(f"| {name} | {cells} |")
        lines.append("")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    args.metrics = M.expand_metrics(args.metrics)
    bns = [b.strip() for b in args.bn.split(",") if b.strip()]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if not args.summary_only:
        run(args, bns)
        if workers.ranked() and int(os.environ["RANK"]) != 0:
            return 0  # (a worker: rank 0 summarises)
    table, evidence = summarise(args, bns)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(table)
    print(table)
    if args.evidence:
        evidence["source"] = "bench/results/" + os.path.basename(md)
        path = os.path.join(HERE, "..", "fastntk", "data", "nas_evidence.json")
        with open(path, "w") as f:
            json.dump(evidence, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"evidence: {os.path.normpath(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
