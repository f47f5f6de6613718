"""The sketched NTK at large N: ``fastntk.ntk_sketch`` (N, m) with Θ ≈ S Sᵀ.

Times the sketch of the NAS-Bench-201 benchmark network on N synthetic CIFAR-shaped
images (the bundled sample has 1,000), reports samples/s and peak memory, and measures
the sketch's error on the first ``--check`` samples against the exact kernel of those
samples (relative Frobenius error of the (check x check) block of S Sᵀ).

``--sweep m1,m2,...`` measures the error instead: for each m and each of ``--seeds``
seeds, the sketch of the first ``--n`` images of the bundled CIFAR-10 sample against
the exact float64 kernel, with the relative Frobenius error ‖S Sᵀ − Θ‖_F / ‖Θ‖_F (mean,
median and largest over the seeds, and the mean times √m, constant where the error
shrinks like 1/√m) and the entries' errors normalised by √(Θ_ii Θ_jj) (median and 99th
percentile over entries and seeds). ``--out`` writes the table as markdown.

Usage:
    python bench/bench_sketch.py --n 20000 --m 4096
    python bench/bench_sketch.py --n 100000 --m 4096 --device cuda
    python bench/bench_sketch.py --sweep 64,256,1024,4096,16384 --seeds 8 --n 64 \
        --out bench/results/sketch_error_cpu.md
    python bench/bench_sketch.py --n 256 --m 4096 --output trace --check 64
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

import fastntk
from fastntk import data
from fastntk.spaces import nb201

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _meta import git_sha, gpu_stack  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--m", type=int, default=4096, help="sketch dimension")
    ap.add_argument("--check", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk", type=int, default=None, help="samples per forward/backward")
    ap.add_argument("--output", default="sum", help='the kernel: "sum", "trace" or "mean"')
    ap.add_argument("--sweep", default=None, help="comma-separated sketch dims: error table")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per sketch dim (--sweep)")
    ap.add_argument("--out", default=None, help="markdown file for the --sweep table")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nb201.build_model(nb201.BENCH_ARCH).to(args.device)
    if args.sweep:
        sweep(model, args)
        return
    x, _ = data.synthetic(args.n, seed=0)
    x = x.to(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    S = fastntk.ntk_sketch(model, x, sketch_dim=args.m, seed=0, chunk_size=args.chunk,
                           output=args.output, progress=True)  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if cuda:
        where = (
            f"peak GPU memory allocated {torch.cuda.max_memory_allocated() / 1e9:.2f} GB, "
            f"reserved {torch.cuda.max_memory_reserved() / 1e9:.2f} GB "
            f"({torch.cuda.get_device_name()}, torch {torch.__version__}, {gpu_stack()}, "
            f"git {git_sha()})"
        )
    else:
        where = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    k = min(args.check, args.n)
    exact = fastntk.ntk(model, x[:k], output=args.output)
    approx = S[:k] @ S[:k].T
    err = ((approx - exact).norm() / exact.norm()).item()
    print(
        f"sketch N={args.n} m={args.m} output={args.output} on {args.device}: S {tuple(S.shape)} in {dt:.1f} s "
        f"({args.n / dt:.0f} samples/s), {where}; relative Frobenius error of the first "
        f"{k} x {k} block against the exact kernel {err:.3f}"
    )


def sweep(model: torch.nn.Module, args: argparse.Namespace) -> None:
    dims = [int(v) for v in args.sweep.split(",")]
    x, _ = data.load_cifar10(args.n)
    x = x.to(args.device, torch.float64)
    exact = fastntk.ntk(model, x, dtype=torch.float64, output=args.output).cpu()
    d = exact.diagonal().sqrt()
    scale = d[:, None] * d[None, :]
    rows = []
    for m in dims:
        errs, entries = [], []
        for seed in range(args.seeds):
            S = fastntk.ntk_sketch(model, x, sketch_dim=m, seed=seed, dtype=torch.float64,
                                   output=args.output).cpu()  # fmt: skip
            approx = S @ S.T
            errs.append(float((approx - exact).norm() / exact.norm()))
            entries.append(((approx - exact).abs() / scale).flatten())
        e = torch.tensor(errs)
        q = torch.cat(entries)
        rows.append((m, float(e.mean()), float(e.median()), float(e.max()),
                     float(e.mean()) * m**0.5, float(q.median()), float(torch.quantile(q, 0.99))))  # fmt: skip
    import platform

    lines = [
        f"Machine: {platform.machine()} ({args.device}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, git {git_sha()}, {time.strftime('%Y-%m-%d')}.",
        f"Command: `python bench/bench_sketch.py --sweep {args.sweep} --seeds {args.seeds} "
        f"--n {args.n} --output {args.output}"
        f"{' --device ' + args.device if args.device != 'cpu' else ''}`",
        "",
        f"NAS-Bench-201 benchmark network (C=16, N=5), the first {args.n} images of the bundled "
        f'CIFAR-10 sample, output "{args.output}", float64. Errors over '
        f"{args.seeds} seeds; entry errors |ΔΘ_ij| / √(Θ_ii Θ_jj).",
        "",
        "| m | rel. Frobenius error, mean | median | max | mean × √m | entry error, median "
        "| entry error, 99th pct |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.2f} | {r[5]:.4f} "
                     f"| {r[6]:.4f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Sketch error against the exact kernel\n\n" + text)


if __name__ == "__main__":
    main()
