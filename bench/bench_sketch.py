"""The sketched NTK at large N: ``fastntk.ntk_sketch`` (N, m) with Θ ≈ S Sᵀ.

Times the sketch of the NAS-Bench-201 benchmark network on N synthetic CIFAR-shaped
images (the bundled sample has 1,000), reports samples/s and peak memory, and measures
the sketch's error on the first ``--check`` samples against the exact kernel of those
samples (relative Frobenius error of the (check x check) block of S Sᵀ).

Usage:
    python bench/bench_sketch.py --n 20000 --m 4096
    python bench/bench_sketch.py --n 100000 --m 4096 --device cuda
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import fastntk
from fastntk import data
from fastntk.spaces import nb201

ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|avg_pool_3x3~2|"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--m", type=int, default=4096, help="sketch dimension")
    ap.add_argument("--check", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk", type=int, default=None, help="samples per forward/backward")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nb201.build_model(ARCH).to(args.device)
    x, _ = data.synthetic(args.n, seed=0)
    x = x.to(args.device)
    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    S = fastntk.ntk_sketch(model, x, sketch_dim=args.m, seed=0, chunk_size=args.chunk, progress=True)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if cuda:
        where = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:
        where = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    k = min(args.check, args.n)
    exact = fastntk.ntk(model, x[:k])
    approx = S[:k] @ S[:k].T
    err = ((approx - exact).norm() / exact.norm()).item()
    print(
        f"sketch N={args.n} m={args.m} on {args.device}: S {tuple(S.shape)} in {dt:.1f} s "
        f"({args.n / dt:.0f} samples/s), {where}; relative Frobenius error of the first "
        f"{k} x {k} block against the exact kernel {err:.3f}"
    )


if __name__ == "__main__":
    main()
