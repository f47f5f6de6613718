"""Large-N run: the exact "sum" kernel of the NB201 benchmark network for N beyond one chunk.

Prints the wall time, the peak resident memory of the process and a consistency check
(the top-left 256 x 256 block equals a direct single-chunk computation of those samples).

Usage:
    python bench/bench_large_n.py --n 4096
    python bench/bench_large_n.py --n 16384 --device cuda     # peak GPU memory reported
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--check", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--chunk", type=int, default=None, help="samples per forward/backward")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="time the call under fastntk.profile() (CUDA syncs at phase boundaries, "
        "a little slower): phase split and the Gram step's TFLOP/s",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nb201.build_model(nb201.BENCH_ARCH).to(args.device)
    x, _ = data.synthetic(args.n, seed=0)  # more than the 1,000 bundled images
    x = x.to(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    import contextlib

    ctx = fastntk.profile() if args.profile else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx as prof:
        theta = fastntk.ntk(model, x, progress=True, method=args.method, chunk_size=args.chunk)
        if cuda:
            torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if cuda:  # GPU memory beyond the (N, N) kernel itself (GB = 1e9 bytes)
        peak = torch.cuda.max_memory_allocated()
        kern = theta.numel() * theta.element_size()
        res = torch.cuda.max_memory_reserved()
        where = (
            f"peak GPU memory allocated {peak / 1e9:.2f} GB ({(peak - kern) / 1e9:.2f} GB beyond the "
            f"{kern / 1e9:.2f} GB kernel; model and inputs included), reserved {res / 1e9:.2f} GB "
            f"({(res - kern) / 1e9:.2f} GB beyond the kernel)"
        )
    else:
        where = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    k = min(args.check, args.n)
    ref = fastntk.ntk(model, x[:k], method=args.method)
    err = ((theta[:k, :k] - ref).abs().max() / ref.abs().max()).item()
    sym = ((theta - theta.T).abs().max() / theta.abs().max()).item()
    dev = f"{torch.cuda.get_device_name()}, {gpu_stack()}" if cuda else "cpu"
    print(f"[{dev}, torch {torch.__version__}, git {git_sha()}; one cold call in a fresh process]")
    print(
        f"N={args.n} sum kernel {tuple(theta.shape)} on {args.device} ({args.method}): "
        f"{dt:.1f} s, {where}, samples/s {args.n / dt:.1f}; block check rel err {err:.2e}, "
        f"asymmetry {sym:.1e}"
    )
    if prof is not None:
        print(
            f"under fastntk.profile(): Gram {prof.gram_flops / 1e12:.2f} TFLOP (2·n_A·n_B·cols "
            f"per product) at {prof.gram_tflops:.2f} TFLOP/s; "
            + " ".join(
                f"{k}={v:.2f}" for k, v in prof.as_dict().items() if k.endswith("_s") and v > 0
            )
        )


if __name__ == "__main__":
    main()
