"""The measurements behind the engine's internal choices, in one script.

* ``conv``: per-sample conv weight-gradient strategies at NAS-Bench-201 shapes
  (unfold+bmm, strided patches+bmm, grouped-conv weight gradient, the C++ op).
* ``trace``: "trace" over 10 logits with all logits' gradients handed to the rules at
  once vs logit by logit (``engine.BATCH_PASSES_BYTES``), alternating in one process.
* ``coupled``: ``bn="batch"`` kernel with one-hot backward passes in a loop vs batched
  with ``is_grads_batched``.

Usage:
    python bench/bench_engine_choices.py [conv] [trace] [coupled]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

import fastntk
from fastntk import _ext, data, engine
from fastntk.spaces import nb201

ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|avg_pool_3x3~2|"


def best_of(f, r=3):
    f()
    ts = []
    for _ in range(r):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def conv(n=128):
    print(f"## per-sample conv weight gradients, N={n}, best of 3 (s)")
    print("| C_in->C_out | k | stride | map | unfold+bmm | strided+bmm | grouped | C++ |")
    print("|---|---|---|---|---|---|---|---|")
    for ci, co, h, k, s in [(16, 16, 32, 3, 1), (16, 16, 32, 1, 1), (16, 32, 32, 3, 2),
                            (32, 32, 16, 3, 1), (64, 64, 8, 3, 1), (64, 64, 8, 1, 1)]:
        print(_conv_row(n, ci, co, h, k, s))


def _conv_row(n, ci, co, h, k, s):
    p = k // 2
    x = torch.randn(n, ci, h, h)
    oh = (h + 2 * p - k) // s + 1
    g = torch.randn(n, co, oh, oh)

    def unf():
        U = F.unfold(x, k, padding=p, stride=s)
        return torch.bmm(g.reshape(n, co, -1), U.transpose(1, 2))

    def strided():
        w = F.pad(x, (p,) * 4).unfold(2, k, s).unfold(3, k, s)
        U = w.permute(0, 1, 4, 5, 2, 3).reshape(n, ci * k * k, oh * oh)
        return torch.bmm(g.reshape(n, co, -1), U.transpose(1, 2))

    def grouped():
        return torch.nn.grad.conv2d_weight(
            x.reshape(1, n * ci, h, h), (n * co, ci, k, k), g.reshape(1, n * co, oh, oh),
            stride=s, padding=p, groups=n)

    cpp = "n/a"
    if _ext.available():
        cpp = f"{best_of(lambda: _ext.conv2d_psg(x, g, kernel_size=k, stride=s, padding=p)):.4f}"
    return (f"| {ci}->{co} | {k} | {s} | {h}x{h} | {best_of(unf):.4f} | {best_of(strided):.4f} "
            f"| {best_of(grouped):.4f} | {cpp} |")


def _model(n):
    torch.manual_seed(0)
    return nb201.build_model(ARCH), data.load_cifar10(n)[0]


def trace(n=32, reps=3):
    m, x = _model(n)
    fastntk.ntk(m, x, output="trace")
    res = {"all logits at once": [], "logit by logit": []}
    for _ in range(reps):
        for name, b in (("logit by logit", 0), ("all logits at once", 2**30)):
            engine.BATCH_PASSES_BYTES = b
            t = time.perf_counter()
            fastntk.ntk(m, x, output="trace")
            res[name].append(time.perf_counter() - t)
    print(f"## trace over 10 logits, NB201, N={n}, {reps} alternating runs (s)")
    for k, v in res.items():
        print(f"{k}: " + ", ".join(f"{t:.2f}" for t in v))


def coupled(n=64):
    m, x = _model(n)
    print(f"## bn='batch' kernel, NB201, N={n} (s, one call each)")
    for name, method in (("loop (auto on CPU)", "auto"), ("batched is_grads_batched", "vmap")):
        t = time.perf_counter()
        fastntk.ntk(m, x, bn="batch", method=method)
        print(f"{name}: {time.perf_counter() - t:.1f}")


if __name__ == "__main__":
    which = sys.argv[1:] or ["conv", "trace", "coupled"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for w in which:
        {"conv": conv, "trace": trace, "coupled": coupled}[w]()
