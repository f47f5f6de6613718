"""Per-sample Conv2d weight gradients on the CPU: fastntk's C++ op vs the PyTorch paths.

NB201-like shapes: N=128, (C, spatial) in {(16, 32), (32, 16), (64, 8)}, 3x3 pad 1 and 1x1,
C_in = C_out = C, stride 1. Providers (same inputs, one process, ratios to unfold+bmm):

- ``unfold+bmm``: F.unfold (an N·C·k²·T buffer) then a batched matmul with gout.
- ``grouped_conv``: one convolution-weight backward with groups=N (Opacus/naive layerwise).
- ``csrc.conv2d_psg``: ``torch.ops.fastntk.conv2d_psg`` (per-thread row-chunk im2col,
  OpenMP over samples; no N-sized buffer).

Usage: ``python bench/bench_conv_psg.py [--repeats 7] [--threads 0]``. Writes
``bench/results/conv_psg_cpu_t<threads>.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gram import _write, machine_info, time_against_first  # noqa: E402


def unfold_bmm(x, gout, k, pad):
    n = x.shape[0]
    u = F.unfold(x, k, padding=pad)  # (N, C·k², T)
    return torch.bmm(gout.reshape(n, gout.shape[1], -1), u.transpose(1, 2))


def grouped_conv(x, gout, k, pad, wdummy):
    n, c, h, w = x.shape
    co = gout.shape[1]
    gw = torch.ops.aten.convolution_backward(
        gout.reshape(1, n * co, *gout.shape[2:]),
        x.reshape(1, n * c, h, w),
        wdummy,
        None,
        [1, 1],
        [pad, pad],
        [1, 1],
        False,
        [0, 0],
        n,
        [False, True, False],
    )[1]
    return gw.reshape(n, co, c, k, k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--n", type=int, default=128)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastntk import _ext

    have_ext = _ext.available()
    n = args.n
    rows = []
    torch.manual_seed(0)
    for c, s in [(16, 32), (32, 16), (64, 8)]:
        for k in (3, 1):
            pad = k // 2
            x = torch.randn(n, c, s, s)
            gout = torch.randn(n, c, s, s)
            wdummy = torch.empty(n * c, c, k, k)
            ref = unfold_bmm(x, gout, k, pad).reshape(n, c, c, k, k)
            provs = {
                "unfold+bmm": lambda x=x, g=gout, k=k, p=pad: unfold_bmm(x, g, k, p),
                "grouped_conv": lambda x=x, g=gout, k=k, p=pad, w=wdummy: grouped_conv(
                    x, g, k, p, w
                ),
            }
            if have_ext:
                provs["csrc.conv2d_psg"] = lambda x=x, g=gout, k=k, p=pad: (
                    torch.ops.fastntk.conv2d_psg(x, g, k, k, 1, 1, p, p, 1, 1, 1)
                )
                err = (provs["csrc.conv2d_psg"]() - ref).abs().max().item()
                assert err < 1e-3 * ref.abs().max().item(), err
            unfold_mb = n * c * k * k * s * s * 4 / 2**20
            for row in time_against_first(provs, args.repeats, f"C={c:3d} HW={s:2d} k={k}"):
                row.pop("_min_s")
                unfold = round(unfold_mb, 1) if row["provider"] == "unfold+bmm" else 0
                rows.append({"N": n, "C": c, "HW": s, "k": k, **row, "unfold_buffer_MB": unfold})
    _write(
        rows,
        f"conv_psg_cpu_t{torch.get_num_threads()}",
        machine_info(),
        "speedups are t(unfold+bmm) / t(provider) (>1: faster than unfold+bmm), on the "
        "median and on the min; speedup_cpu on the process CPU time (robust to other "
        "load). C_in = C_out = C, stride 1, 'same' padding.",
    )


if __name__ == "__main__":
    main()
