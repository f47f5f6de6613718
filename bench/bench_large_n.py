"""Large-N run: the exact "sum" kernel of the NB201 benchmark network for N beyond one chunk.

Prints the wall time, the peak resident memory of the process and a consistency check
(the top-left 256 x 256 block equals a direct single-chunk computation of those samples).

Usage:
    python bench/bench_large_n.py --n 4096
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
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nb201.build_model(ARCH)
    x, _ = data.synthetic(args.n, seed=0)  # more than the 1,000 bundled images
    t0 = time.perf_counter()
    theta = fastntk.ntk(model, x, progress=True)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    k = min(args.check, args.n)
    ref = fastntk.ntk(model, x[:k])
    err = ((theta[:k, :k] - ref).abs().max() / ref.abs().max()).item()
    sym = ((theta - theta.T).abs().max() / theta.abs().max()).item()
    print(
        f"N={args.n} sum kernel {tuple(theta.shape)}: {dt:.1f} s, peak RSS {peak:.2f} GiB, "
        f"samples/s {args.n / dt:.1f}; block check rel err {err:.2e}, asymmetry {sym:.1e}"
    )


if __name__ == "__main__":
    main()
