"""The measurements behind the engine's internal choices, in one script.

* ``conv``: per-sample conv weight-gradient strategies at NAS-Bench-201 shapes
  (unfold+bmm, strided patches+bmm, grouped-conv weight gradient, the C++ op).
* ``trace``: "trace" over 10 logits with all logits' gradients handed to the rules at
  once vs logit by logit (``engine.BATCH_PASSES_BYTES``), and big Gram blocks in their
  own GEMM vs copied into the buffer (``engine.GRAM_DIRECT_BYTES``), alternating in one
  process.
* ``pool``: NAS-Bench-201's avg_pool_3x3 as PyTorch's avg_pool2d vs a box-filter conv.
* ``coupled``: ``bn="batch"`` kernel with one-hot backward passes in a loop vs batched
  with ``is_grads_batched``.

Usage:
    python bench/bench_engine_choices.py [conv] [trace] [pool] [coupled]
"""

from __future__ import annotations

import statistics
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


def trace(n=32, reps=5):
    """The engine's two trace-mode choices, alternating in one process (median of reps):
    all logits' output gradients kept and handed to the rules together (``BATCH_PASSES_BYTES``)
    or logit by logit; big dense blocks in their own Gram GEMM (``GRAM_DIRECT_BYTES``) or
    copied into the shared buffer first."""
    m, x = _model(n)
    fastntk.ntk(m, x, output="trace")
    configs = {
        "logit by logit, buffered Gram": (0, 2**62),
        "logit by logit, direct Gram": (0, 2**20),
        "all logits at once, direct Gram (default)": (2**40, 2**20),
    }
    saved = engine.BATCH_PASSES_BYTES, engine.GRAM_DIRECT_BYTES
    res = {k: [] for k in configs}
    try:
        for _ in range(reps):
            for name, (b, d) in configs.items():
                engine.BATCH_PASSES_BYTES, engine.GRAM_DIRECT_BYTES = b, d
                t = time.perf_counter()
                fastntk.ntk(m, x, output="trace")
                res[name].append(time.perf_counter() - t)
    finally:
        engine.BATCH_PASSES_BYTES, engine.GRAM_DIRECT_BYTES = saved
    print(f"## trace over 10 logits, NB201, N={n}, {reps} alternating runs (s)")
    print("| configuration | median | runs |")
    print("|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {statistics.median(v):.2f} | " + ", ".join(f"{t:.2f}" for t in v) + " |")


def pool(n=32):
    """NB201's avg_pool_3x3 (count_include_pad=False): PyTorch's avg_pool2d vs the
    box-filter convolution of ``fastntk.spaces.nb201.AvgPool3x3``, forward and backward."""
    print(f"## avg_pool_3x3, N={n}, best of 3 (ms)")
    print("| C x H x W | avg_pool2d fwd | box conv fwd | avg_pool2d bwd | box conv bwd |")
    print("|---|---|---|---|---|")
    for c, h in ((16, 32), (32, 16), (64, 8)):
        x = torch.randn(n, c, h, h, requires_grad=True)
        row = []
        for mod in (torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False), nb201.AvgPool3x3(1)):
            y = mod(x)
            g = torch.randn_like(y)
            row.append((best_of(lambda mod=mod, x=x: mod(x).detach()),
                        best_of(lambda y=y, g=g, x=x: torch.autograd.grad(y, x, g, retain_graph=True))))
        (pf, pb), (cf, cb) = row
        print(f"| {c}x{h}x{h} | {1e3 * pf:.2f} | {1e3 * cf:.2f} | {1e3 * pb:.2f} | {1e3 * cb:.2f} |")


def coupled(n=64):
    m, x = _model(n)
    print(f"## bn='batch' kernel, NB201, N={n} (s, one call each)")
    for name, method in (("loop (auto on CPU)", "auto"), ("batched is_grads_batched", "vmap")):
        t = time.perf_counter()
        fastntk.ntk(m, x, bn="batch", method=method)
        print(f"{name}: {time.perf_counter() - t:.1f}")


if __name__ == "__main__":
    which = sys.argv[1:] or ["conv", "trace", "pool", "coupled"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for w in which:
        {"conv": conv, "trace": trace, "pool": pool, "coupled": coupled}[w]()
