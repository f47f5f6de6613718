"""Gram accumulation Θ += G Gᵀ on the CPU: fastntk's C++ ops vs the PyTorch paths.

Providers (same inputs, one process, timings as ratios to ``torch.mm``):

- ``torch.mm``: ``a @ a.T`` (MKL/oneDNN sgemm, full product).
- ``addmm_``: ``out.addmm_(a, a.T)`` (in-place accumulation, what the engine would call).
- ``torch_blocked_sym``: upper-triangle 128-row blocks with ``addmm_`` + mirror (pure PyTorch).
- ``csrc.gram_sym``: ``torch.ops.fastntk.gram_sym`` (upper tiles, mirrored, OpenMP).
- ``csrc.gram_sym_fp64acc``: the same with a float64 accumulator.

Usage: ``python bench/bench_gram.py [--repeats 7] [--threads 0] [--quick]``. Writes
``bench/results/gram_cpu_t<threads>.md`` and ``.csv``. Median of ``repeats`` warm calls;
the spread is the (max - min) / median. On a shared 2-core machine expect noise: read the
ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _meta import git_sha  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timeit(fn, repeats: int) -> tuple[float, float, float, float]:
    """(wall median, wall min, wall (max - min) / median, process CPU-time median), seconds.

    On a shared machine the wall time of a call includes time stolen by other processes;
    the process CPU time (all threads summed) does not, so its ratios are the steadier ones
    (compare providers at the same thread count only).
    """
    fn()  # warm-up
    ts, cs = [], []
    for _ in range(repeats):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    med = statistics.median(ts)
    return med, min(ts), (max(ts) - min(ts)) / med, statistics.median(cs)


def time_against_first(provs: dict, repeats: int, label: str) -> list[dict]:
    """Times each provider (:func:`_timeit`) against the first one; prints a line each.

    Returns one row per provider: its name and times, and its speed-ups over the first
    provider on the median, on the min and on the process CPU time.
    """
    rows, base = [], None
    for name, fn in provs.items():
        med, tmin, spread, cpu = _timeit(fn, repeats)
        base = base or (med, tmin, cpu)
        up = (base[0] / med, base[1] / tmin, base[2] / max(cpu, 1e-9))
        rows.append({
            "provider": name,
            "median_ms": round(med * 1e3, 2),
            "min_ms": round(tmin * 1e3, 2),
            "spread": round(spread, 2),
            "speedup_median": round(up[0], 2),
            "speedup_min": round(up[1], 2),
            "cpu_ms": round(cpu * 1e3, 2),
            "speedup_cpu": round(up[2], 2),
            "_min_s": tmin,
        })  # fmt: skip
        print(f"{label} {name:22s} {med * 1e3:9.2f} ms (min {tmin * 1e3:8.2f})  x{up[0]:5.2f} "
              f"(min x{up[1]:5.2f}, cpu x{up[2]:5.2f})")  # fmt: skip
    return rows


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    sha = git_sha()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": sha,
        "loadavg_1min": f"{load:.1f}",
    }


def blocked_sym_torch(a: torch.Tensor, out: torch.Tensor, block: int = 128) -> torch.Tensor:
    """out += a aᵀ computing only the upper-triangle row blocks with addmm_ (then mirrored)."""
    n = a.shape[0]
    for i in range(0, n, block):
        ai = a[i : i + block]
        for j in range(i, n, block):
            blk = ai @ a[j : j + block].T
            out[i : i + block, j : j + block] += blk
            if j != i:
                out[j : j + block, i : i + block] += blk.T
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0: default)")
    ap.add_argument("--quick", action="store_true", help="smallest shapes only")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    from fastntk import _ext

    have_ext = _ext.available()
    if not have_ext:
        print(f"fastntk._C unavailable ({_ext.why_not()}): PyTorch providers only")
    ns = [64, 128, 256]
    ps = [2304, 9216, 36864]
    if args.quick:
        ns, ps = [64], [2304]
    rows = []
    torch.manual_seed(0)
    for n in ns:
        for p in ps:
            a = torch.randn(n, p)
            out = torch.zeros(n, n)
            out64 = torch.zeros(n, n)
            provs = {
                "torch.mm": lambda a=a: a @ a.T,
                "addmm_": lambda a=a, out=out: out.addmm_(a, a.T),
                "torch_blocked_sym": lambda a=a, out=out: blocked_sym_torch(a, out),
            }
            if have_ext:
                provs["csrc.gram_sym"] = lambda a=a, out=out: torch.ops.fastntk.gram_sym(
                    a, out, False
                )
                provs["csrc.gram_sym_fp64acc"] = lambda a=a, o=out64: torch.ops.fastntk.gram_sym(
                    a, o, True
                )
            for row in time_against_first(provs, args.repeats, f"N={n:4d} P={p:6d}"):
                tmin = row.pop("_min_s")
                rows.append(
                    {"N": n, "P": p, **row, "GFLOP/s_useful_min": round(n * n * p / tmin / 1e9, 1)}
                )
    _write(
        rows,
        f"gram_cpu_t{torch.get_num_threads()}",
        machine_info(),
        "speedups are t(torch.mm) / t(provider) (>1: faster than torch.mm), on the median "
        "and on the min; speedup_cpu uses the process CPU time (robust to other load). "
        "GFLOP/s_useful_min counts 2·N·N·P/2 flops (the symmetric half), from the min.",
    )


def _write(rows, stem, info, note) -> None:
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    base = os.path.join(ROOT, "bench", "results", stem)
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(info) + list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**info, **r})
    with open(base + ".md", "w") as f:
        f.write(f"# {stem}\n\n")
        f.write(" | ".join(f"{k}: {v}" for k, v in info.items()) + "\n\n")
        f.write(note + "\n\n")
        keys = list(rows[0])
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[k]) for k in keys) + " |\n")
    print(f"wrote {base}.md and .csv")


if __name__ == "__main__":
    main()
