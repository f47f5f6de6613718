"""Large-N run: the exact "sum" kernel of the NB201 benchmark network for N beyond one chunk.

Prints the wall time, the peak resident memory of the process and a consistency check
(the top-left 256 x 256 block equals a direct single-chunk computation of those samples).

Usage:
    python bench/bench_large_n.py --n 4096
    python bench/bench_large_n.py --n 16384 --device cuda     # peak GPU memory reported
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--check", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--chunk", type=int, default=None, help="samples per forward/backward")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nb201.build_model(ARCH).to(args.device)
    x, _ = data.synthetic(args.n, seed=0)  # more than the 1,000 bundled images
    x = x.to(args.device)
    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    theta = fastntk.ntk(model, x, progress=True, method=args.method, chunk_size=args.chunk)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if cuda:  # GPU memory beyond the kernel itself, as the issue counts it
        peak = torch.cuda.max_memory_allocated() / 2**30
        extra = peak - theta.numel() * theta.element_size() / 2**30
        where = f"peak GPU memory {peak:.2f} GiB ({extra:.2f} GiB beyond the kernel)"
    else:
        where = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    k = min(args.check, args.n)
    ref = fastntk.ntk(model, x[:k], method=args.method)
    err = ((theta[:k, :k] - ref).abs().max() / ref.abs().max()).item()
    sym = ((theta - theta.T).abs().max() / theta.abs().max()).item()
    print(
        f"N={args.n} sum kernel {tuple(theta.shape)} on {args.device} ({args.method}): "
        f"{dt:.1f} s, {where}, samples/s {args.n / dt:.1f}; block check rel err {err:.2e}, "
        f"asymmetry {sym:.1e}"
    )


if __name__ == "__main__":
    main()
