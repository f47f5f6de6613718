"""Kendall's τ of fastntk's training-free metrics against NAS-Bench-201 CIFAR-10 accuracy.

Evidence script (not a CI test). For a seeded random sample of NAS-Bench-201
architectures, it builds each network at initialisation, computes every metric of
``fastntk.metrics`` on the bundled CIFAR-10 sample (``fastntk/data/cifar10_1000.npz``,
normalised with the CIFAR-10 mean/std) for each BatchNorm mode, and reports Kendall's τ
(``scipy.stats.kendalltau``) against the 200-epoch CIFAR-10 test accuracy, next to the
parameter-count baseline on the same sample.

Data: train batch = the first ``--batch-size`` images of the sample's seeded permutation,
test batch = the next ``--batch-size`` (``fastntk.data.load_cifar10(n, seed, offset)``).
Kernel metrics (fnorm, mean, ncn, lga, trainability) use Θ(train, train); the NTK-score
S_e / S_g use kernel regression train -> test (``compute_metrics(..., x_test=...)``);
vintk uses the train batch. Each architecture's weights are initialised from
``torch.manual_seed(seed ^ crc32(arch))`` (the same network in every BN mode and rerun).

Incremental: one CSV row per (arch, bn) is appended and flushed as soon as it is
computed; a rerun with the same ``--out`` skips the rows already there. The summary
(markdown table, printed and written next to the CSV) is computed from all rows.

Cost: each row's wall time is its ``seconds`` column. On the 2-core AMD EPYC at batch 64,
eval rows (every metric: one engine call on 3×64 images, one on 64 high-passed images)
took 0.35-2.3 s (``bench/results/nb201_metric_correlation.csv``), ``bn="batch"`` rows
(fnorm, mean, ncn, lga: the coupled path) 6-890 s, median 25 s
(``bench/results/nb201_metric_correlation_batch.csv``). So run eval first:

    python3 bench/nb201_metric_correlation.py --archs 200 --batch-size 64 --bn eval

then batch mode (appends to the same CSV; the summary covers both), with ``--device cuda``
or time to spare:

    python3 bench/nb201_metric_correlation.py --archs 200 --batch-size 64 --bn eval,batch

A stopped run resumes where it stopped; ``--summary-only`` summarises the rows so far.

Quick check:

    python3 bench/nb201_metric_correlation.py --archs 3 --out bench/results/nb201_smoke.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import random
import sys
import time
import zlib

import numpy as np
import torch
from scipy.stats import kendalltau

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastntk import metrics as M  # noqa: E402
from fastntk.data import load_cifar10  # noqa: E402
from fastntk.spaces import nb201  # noqa: E402

DEFAULT_METRICS = (
    "fnorm",
    "mean",
    "ncn",
    "lga",
    "trainability",
    "expressivity",
    "generalization",
    "vintk",
)

PARAM_SETS = {
    "all": None,
    # TE-NAS / LGA-code convention: tensors whose name contains "weight" (BN gammas too).
    "weights": lambda name, p: "weight" in name,
    # LGA reference code: weights, classifier excluded.
    "weights-noclf": lambda name, p: "weight" in name and not name.startswith("classifier"),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", type=int, default=200, help="number of sampled architectures")
    ap.add_argument("--batch-size", type=int, default=64, help="train (and test) batch size")
    ap.add_argument("--bn", default="eval,batch", help="comma-separated BN modes")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    ap.add_argument("--params", default="all", choices=sorted(PARAM_SETS))
    ap.add_argument("--seed", type=int, default=0, help="seed of the arch sample, data, init")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float64"),
        help="dtype of the kernels (float32 resolves condition numbers up to "
        "1/(N·eps32) only: ncn saturates at -inf beyond)",
    )
    ap.add_argument("--device", default="cpu", help="torch device of models and data")
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="compute nothing: summarise the rows already in --out (e.g. of a stopped run)",
    )
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "nb201_metric_correlation.csv"),
    )
    return ap.parse_args(argv)


def arch_seed(seed: int, arch: str) -> int:
    return (seed ^ zlib.crc32(arch.encode())) & 0x7FFFFFFF


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fnum(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def tau(a, b) -> tuple[float, int]:
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    ok = ~(np.isnan(a) | np.isnan(b))
    if ok.sum() < 3:
        return float("nan"), int(ok.sum())
    # ±inf (a singular kernel's ncn) are ordered values: map them past the finite range
    a = a[ok].copy()
    fin = np.isfinite(a)
    if not fin.all():
        lo, hi = (a[fin].min(), a[fin].max()) if fin.any() else (0.0, 0.0)
        a[a == np.inf] = hi + 1.0 + abs(hi)
        a[a == -np.inf] = lo - 1.0 - abs(lo)
    t = kendalltau(a, b[ok]).statistic
    return float(t), int(ok.sum())


def same_setting(r: dict, args) -> bool:
    """A row of this run's setting (rows written before the dtype column: float32)."""
    return (
        r.get("seed") == str(args.seed)
        and r.get("batch_size") == str(args.batch_size)
        and r.get("params_set") == args.params
        and (r.get("dtype") or "float32") == args.dtype
    )


def summarise(rows: list[dict], metrics: list[str], bns: list[str], archs: set[str]) -> str:
    lines = []
    header = "| metric | direction | " + " | ".join(f"τ ({bn})" for bn in bns) + " |"
    lines += [header, "|" + "---|" * (2 + len(bns))]
    by_bn = {bn: [r for r in rows if r["bn"] == bn and r["arch"] in archs] for bn in bns}
    ns = {bn: len(v) for bn, v in by_bn.items()}

    def row(name, direction, values_fn):
        cells = []
        for bn in bns:
            rs = by_bn[bn]
            if not rs:
                cells.append("–")
                continue
            vals = values_fn(rs)
            acc = [fnum(r["accuracy"]) for r in rs]
            t, n = tau(vals, acc)
            cells.append(f"{t:+.3f}" + (f" (n={n})" if n != len(rs) else ""))
        lines.append(f"| {name} | {direction} | " + " | ".join(cells) + " |")

    row("params (baseline)", "+", lambda rs: [fnum(r["params"]) for r in rs])
    for m in metrics:
        d = "+" if M.DIRECTIONS[m] else "−"
        sign = 1.0 if M.DIRECTIONS[m] else -1.0
        row(f"{m} (oriented)", d, lambda rs, m=m, s=sign: [s * fnum(r[m]) for r in rs])
    if "expressivity" in metrics:
        row(
            "S_e, higher better (= −CE, Eq. 9 value)",
            "+",
            lambda rs: [fnum(r["expressivity"]) for r in rs],
        )
        row("S_e, lower better (= CE)", "−", lambda rs: [-fnum(r["expressivity"]) for r in rs])
    trio = ("trainability", "expressivity", "generalization")
    if all(m in metrics for m in trio):
        for se_hib in (True, False):
            for st_hib in (False, True):

                def borda_vals(rs, se_hib=se_hib, st_hib=st_hib):
                    tab = [[fnum(r[m]) for m in trio] for r in rs]
                    return M.borda(tab, [st_hib, se_hib, False])

                row(
                    f"ntk_score Borda (S_t {'higher' if st_hib else 'lower'}, "
                    f"S_e {'higher' if se_hib else 'lower'} better)",
                    "+",
                    borda_vals,
                )
    lines.append("")
    lines.append(
        "rows per BN mode: "
        + ", ".join(f"{bn}: {ns[bn]}" for bn in bns)
        + ". 'oriented' = value × (+1 if higher_is_better else −1) per "
        "fastntk.metrics.DIRECTIONS, so a positive τ means the metric's "
        "documented direction agrees with accuracy."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bns = [b.strip() for b in args.bn.split(",") if b.strip()]
    metrics = M.expand_metrics(args.metrics)
    params = PARAM_SETS[args.params]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    archs = random.Random(args.seed).sample(nb201.all_archs(), args.archs)
    xtr, ytr = load_cifar10(args.batch_size, seed=args.seed)
    xte, yte = load_cifar10(args.batch_size, seed=args.seed, offset=args.batch_size)
    xtr, xte = xtr.to(args.device), xte.to(args.device)

    fields = [
        "arch",
        "bn",
        "seed",
        "batch_size",
        "params_set",
        "dtype",
        "params",
        "accuracy",
        *metrics,
        "seconds",
        "error",
    ]
    existing = [r for r in read_rows(args.out) if same_setting(r, args)]
    done = {(r["arch"], r["bn"]) for r in existing}
    if existing and list(existing[0].keys()) != fields and not args.summary_only:
        print(f"note: {args.out} has other columns; new rows go to a fresh file", file=sys.stderr)
        base, ext = os.path.splitext(args.out)
        args.out = f"{base}.{int(time.time())}{ext}"
        existing, done = [], set()
    new_file = not os.path.exists(args.out)
    todo = [(a, bn) for a in archs for bn in bns if (a, bn) not in done]
    if args.summary_only:
        todo = []
    print(
        f"# {len(archs)} archs × {len(bns)} BN modes: {len(todo)} rows to compute, "
        f"{len(archs) * len(bns) - len(todo)} already in {args.out}",
        flush=True,
    )
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, device {args.device}, batch {args.batch_size}, "
        f"params={args.params}",
        flush=True,
    )

    t_start = time.time()
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            w.writeheader()
        for i, (arch, bn) in enumerate(todo):
            torch.manual_seed(arch_seed(args.seed, arch))
            model = nb201.build_model(arch, num_classes=10).to(args.device)
            row = {
                "arch": arch,
                "bn": bn,
                "seed": args.seed,
                "batch_size": args.batch_size,
                "params_set": args.params,
                "dtype": args.dtype,
                "params": sum(p.numel() for p in model.parameters()),
                "accuracy": nb201.accuracy(arch, args.dataset),
                "error": "",
            }
            t0 = time.time()
            try:
                vals = M.compute_metrics(
                    model,
                    xtr,
                    ytr,
                    metrics,
                    bn=bn,
                    params=params,
                    x_test=xte,
                    y_test=yte,
                    num_classes=10,
                    seed=args.seed,
                    dtype=getattr(torch, args.dtype),
                    errors="nan",
                )
                row.update(vals)
                bad = [m for m, v in vals.items() if isinstance(v, float) and math.isnan(v)]
                if bad:
                    row["error"] = "undefined: " + " ".join(bad)
            except Exception as e:  # record and go on: one bad arch must not stop the run
                row.update({m: "nan" for m in metrics})
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            row["seconds"] = f"{time.time() - t0:.2f}"
            w.writerow(row)
            f.flush()
            el = time.time() - t_start
            eta = el / (i + 1) * (len(todo) - i - 1)
            short = " ".join(f"{m}={fnum(row[m]):.4g}" for m in metrics)
            print(
                f"[{i + 1}/{len(todo)}] {bn:5s} acc={row['accuracy']:.2f} "
                f"{row['seconds']}s eta {eta / 60:.1f} min  {short} {row['error']}",
                flush=True,
            )

    rows = [r for r in read_rows(args.out) if same_setting(r, args)]
    table = summarise(rows, metrics, bns, set(archs))
    title = (
        f"## Kendall τ vs NAS-Bench-201 {args.dataset} 200-epoch test accuracy "
        f"({len(archs)} sampled archs, seed {args.seed}, batch {args.batch_size}, "
        f"params={args.params}, {args.dtype} kernels)\n"
    )
    from _meta import git_sha

    where = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}. "
        f"Command: `python3 bench/nb201_metric_correlation.py {' '.join(sys.argv[1:])}`; "
        f"summary written at commit {git_sha()}, {time.strftime('%Y-%m-%d')} (the CSV's rows "
        "may come from earlier runs of the same setting: its rows do not record a commit).\n"
    )
    print("\n" + title + "\n" + where + "\n" + table)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(title + "\n" + where + "\n" + table + "\n")
    print(f"\nrows: {args.out}\nsummary: {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
