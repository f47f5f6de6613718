"""The measurements behind the engine's internal choices, in one script.

* ``conv``: per-sample conv weight-gradient strategies at NAS-Bench-201 and ResNet shapes
  (strided patches+bmm, grouped-conv weight gradient in one call or in sample chunks, the
  C++ op), with page faults per call.
* ``chunks``: the grouped strategy's sample chunks inside ``ntk()`` (time and page faults).
* ``gram``: symmetric and cross Gram blocks, torch.mm vs the C++ kernels.
* ``affine``: BatchNorm weight+bias blocks, PyTorch ops vs the C++ one-pass op.
* ``per_sample_bn``: ``bn="per_sample"``'s normalisation by mean, ``torch.var`` and
  elementwise ops vs ``F.group_norm``; its statistics by ``torch.var`` vs two passes.
* ``layer_norm``: the LayerNorm rule's weight block with ``xhat`` recomputed by
  ``F.layer_norm`` vs from the statistics autograd saved.
* ``lookup``: a relative-position table's per-sample gradients (``SampleFreeRule``) by a
  batched product through the lookup vs to the lookup's output and one ``index_add_``.
* ``trace``: "trace" over 10 logits with all logits' gradients handed to the rules at
  once vs logit by logit (``fastntk.engine.sizes.BATCH_PASSES_BYTES``), and big Gram blocks in their
  own GEMM vs copied into the buffer (``fastntk.engine.sizes.GRAM_DIRECT_BYTES``), alternating in one
  process.
* ``pool``: NAS-Bench-201's avg_pool_3x3 as PyTorch's avg_pool2d vs a box-filter conv.
* ``coupled``: ``bn="batch"`` kernel with one-hot backward passes in a loop
  (``method="loop"``; ``auto`` on the CPU) vs batched with ``is_grads_batched`` (``auto`` on
  a GPU, and ``vmap``), with ``--device cuda`` on a GPU.
* ``mha``: ``nn.MultiheadAttention`` through its rule vs the per-module fallback vs vmap.
* ``depthwise``: per-sample weight gradients of convolutions with few input channels per
  group (ConvNeXt's depthwise 7x7, stems) by a forward convolution vs the strategies above
  (``rules.conv.DEPTHWISE_FORWARD``).
* ``blocks``: the cap on Linear-on-token blocks (``rules.CACHE_BLOCK_BYTES``, 4 MiB) on
  and off, and the engine's block budget (``sizes.BLOCK_BYTES``) at 4 MiB for every layer,
  on Hugging Face models (``bench_hf_zoo.py``'s zoo) and the NB201 network, "sum".
* ``positions``: a layer applied at T positions (convolution windows, tokens) as an Outer
  block with positions (its Gram never forms G) vs dense per-sample gradients and their
  symmetric Gram, with the choice ``rules.outer_pays`` makes.

Usage:
    python bench/bench_engine_choices.py [conv] [chunks] [gram] [affine] [per_sample_bn] [layer_norm] [lookup] [trace]
        [pool] [coupled]
        [mha] [depthwise] [positions] [blocks]
        [--device cpu|cuda]   (the device of the coupled section's model and data)
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import torch

import fastntk
from fastntk import _ext, data
from fastntk.engine import sizes
from fastntk.rules import conv as conv_rule
from fastntk.spaces import nb201


def _times(f, r):
    f()
    ts = []
    for _ in range(r):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return ts


def best_of(f, r=3):
    return min(_times(f, r))


def median_of(f, r=101):
    return statistics.median(_times(f, r))


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def best_of_faults(f, r=5):
    """(best time in s, median minor page faults per call) over r calls after a warm-up."""
    f()
    ts, fs = [], []
    for _ in range(r):
        f0 = _faults()
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
        fs.append(_faults() - f0)
    return min(ts), int(statistics.median(fs))


def conv(n=128):
    """Per-sample conv weight-gradient strategies of rules/conv.py at NB201 and ResNet shapes,
    each writing into one reused output buffer as the engine does. Page faults per call
    show the allocator effect that GROUPED_CHUNK_BYTES avoids."""
    print(
        f"## per-sample conv weight gradients, N={n}, best of 5 (ms; median page faults per call)"
    )
    print(
        "| C_in->C_out | k | stride | map | strided+bmm | grouped, one call | "
        f"grouped, chunks of {conv_rule.GROUPED_CHUNK_BYTES >> 20} MiB | C++ op |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for ci, co, h, k, s in [
        (16, 16, 32, 3, 1),
        (16, 16, 32, 1, 1),
        (16, 32, 32, 3, 2),
        (32, 32, 16, 3, 1),
        (64, 64, 8, 3, 1),
        (64, 64, 8, 1, 1),
        (128, 128, 8, 3, 1),
        (256, 256, 4, 3, 1),
    ]:
        print(_conv_row(n, ci, co, h, k, s))


def _conv_row(n, ci, co, h, k, s):
    from fastntk.rules import Context, Workspace

    p = k // 2
    mod = torch.nn.Conv2d(ci, co, k, stride=s, padding=p, bias=False)
    x = torch.randn(n, ci, h, h)
    oh = (h + 2 * p - k) // s + 1
    g = torch.randn(n, co, oh, oh)
    ctx = Context("eval", "torch", Workspace())
    out = torch.empty(n, co * ci * k * k)
    saved = conv_rule.GROUPED_CHUNK_BYTES

    def grouped(chunk_bytes):
        def f():
            conv_rule.GROUPED_CHUNK_BYTES = chunk_bytes
            try:
                conv_rule._grouped_weight_grad(mod, x, g, 1, out)
            finally:
                conv_rule.GROUPED_CHUNK_BYTES = saved

        return f

    cells = [
        best_of_faults(lambda: conv_rule._patches_weight_grad(mod, ctx, x, g, 1, out)),
        best_of_faults(grouped(2**62)),
        best_of_faults(grouped(saved)),
    ]
    cpp = "n/a"
    if _ext.available():
        t, f = best_of_faults(lambda: _ext.conv2d_psg(x, g, kernel_size=k, stride=s, padding=p))
        cpp = f"{1e3 * t:.2f} ({f})"
    body = " | ".join(f"{1e3 * t:.2f} ({f})" for t, f in cells)
    return f"| {ci}->{co} | {k} | {s} | {h}x{h} | {body} | {cpp} |"


def chunks(reps=3):
    """The grouped strategy's sample chunks inside the engine (``GROUPED_CHUNK_BYTES``):
    NB201 "sum" kernels, time and minor page faults of all grouped per-sample gradients of
    one call, per conv shape (channels, map), best call of ``reps``."""
    print(
        "## grouped per-sample conv gradients inside ntk(), NB201 sum, by chunk size "
        "(ms, page faults per call)"
    )
    print("| N | chunk | 16 ch 32x32 | 32 ch 16x16 | 64 ch 8x8 | ntk() s |")
    print("|---|---|---|---|---|---|")
    orig, saved = conv_rule._grouped_weight_grad, conv_rule.GROUPED_CHUNK_BYTES
    stats: dict = {}

    def spy(module, xs, gs, hg, out=None):
        f0, t = _faults(), time.perf_counter()
        res = orig(module, xs, gs, hg, out)
        key = (xs.shape[1], gs.shape[-1])
        if module.stride[0] == 1 and key in ((16, 32), (32, 16), (64, 8)):
            st = stats.setdefault(key, [0.0, 0])
            st[0] += time.perf_counter() - t
            st[1] += _faults() - f0
        return res

    conv_rule._grouped_weight_grad = spy
    try:
        for n in (64, 128):
            m, x = _model(n)
            for label, size in (("1 MiB", 2**20), ("4 MiB", 4 * 2**20), ("one call", 2**62)):
                conv_rule.GROUPED_CHUNK_BYTES = size
                fastntk.ntk(m, x)
                best = None
                for _ in range(reps):
                    stats.clear()
                    t = time.perf_counter()
                    fastntk.ntk(m, x)
                    total = time.perf_counter() - t
                    if best is None or total < best[0]:
                        best = (total, dict(stats))
                cells = " | ".join(
                    f"{1e3 * best[1][k][0]:.1f} ({best[1][k][1]})"
                    for k in ((16, 32), (32, 16), (64, 8))
                )
                print(f"| {n} | {label} | {cells} | {best[0]:.3f} |")
    finally:
        conv_rule._grouped_weight_grad, conv_rule.GROUPED_CHUNK_BYTES = orig, saved


def gram():
    """Symmetric Gram blocks G Gᵀ at the engine's block shapes: torch.mm vs the C++
    upper-triangle kernel (rules.CSRC_GRAM_MIN_COLS), float32 and float64; and a cross
    block G Hᵀ (N x N/2), which auto gives the C++ kernel within rules.CSRC_CROSS_MIN_COLS
    and CSRC_CROSS_MAX_PAIRS."""
    print("## Gram blocks, best of 5 (ms)")
    print(
        "C++ tiles: AVX-512 6x4 blocks where the CPU has AVX-512F (the default), AVX2 4x3 "
        "blocks with FASTNTK_NO_AVX512=1; the speed-up is torch.mm over the default."
    )
    print(
        "| dtype | N | columns | sym torch.mm | sym C++ AVX2 | sym C++ | speed-up "
        "| cross torch.mm | cross C++ |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    if not _ext.available():
        print(f"C++ extension not built: {_ext.why_not()}")
        return
    for dt in (torch.float32, torch.float64):
        for n, cols in (
            (128, 64),
            (128, 256),
            (128, 2304),
            (128, 36864),
            (256, 36864),
            (32, 36864),
            (512, 9216),
            (1280, 36864),
        ):
            a = torch.randn(n, cols, dtype=dt)
            b = torch.randn(n // 2, cols, dtype=dt)
            o, oc = torch.zeros(n, n, dtype=dt), torch.zeros(n, n // 2, dtype=dt)
            mm = best_of(lambda: torch.addmm(o, a, a.T, out=o), 5)
            os.environ["FASTNTK_NO_AVX512"] = "1"  # read by the op at each call
            cs2 = best_of(lambda: _ext.gram_sym(a, o), 5)
            os.environ.pop("FASTNTK_NO_AVX512")
            cs = best_of(lambda: _ext.gram_sym(a, o), 5)
            xm = best_of(lambda: torch.addmm(oc, a, b.T, out=oc), 5)
            xc = best_of(lambda: _ext.gram_cross(a, b, oc), 5)
            print(
                f"| {str(dt)[6:]} | {n} | {cols} | {1e3 * mm:.2f} | {1e3 * cs2:.2f} | "
                f"{1e3 * cs:.2f} | {mm / cs:.2f}x | {1e3 * xm:.2f} | {1e3 * xc:.2f} |"
            )


def affine(n=128):
    """BatchNorm weight+bias per-sample blocks (eval): PyTorch ops (centre, multiply, two
    reductions) vs the C++ one-pass op, at NB201's three BatchNorm shapes."""
    print(f"## BatchNorm weight + bias blocks, eval, N={n}, best of 5 (ms)")
    print("| C x H x W | PyTorch ops | C++ one pass | speed-up |")
    print("|---|---|---|---|")
    from fastntk.rules import Context
    from fastntk.rules.norm import BatchNormRule

    rule = BatchNormRule()
    for c, h in ((16, 32), (32, 16), (64, 8)):
        bnm = torch.nn.BatchNorm2d(c).eval()
        bnm.running_mean.uniform_(-1, 1)
        x, g = torch.randn(n, c, h, h), torch.randn(n, c, h, h)
        times = []
        for backend in ("torch", "auto"):
            ctx = Context("eval", backend, None, ("weight", "bias"))
            saved = rule.save(bnm, (x,), {}, None, ctx)

            def both(saved=saved):
                rule.grad_rows(bnm, saved, g, "weight", 0, c)
                rule.grad_rows(bnm, saved, g, "bias", 0, c)

            times.append(best_of(both, 5))
        cpp = f"{1e3 * times[1]:.2f}" if _ext.available() else "n/a"
        print(f"| {c}x{h}x{h} | {1e3 * times[0]:.2f} | {cpp} | {times[0] / times[1]:.2f}x |")


def per_sample_bn(n=64):
    """``bn="per_sample"``'s normalisation, each sample's channels over their positions:
    the mean, ``torch.var`` and elementwise ops against ``F.group_norm`` with a group per
    channel (forward, and forward+backward with the affine); the statistics alone (the
    fused affine rule's) by ``torch.var`` against the two-pass mean of squared deviations."""
    import torch.nn.functional as F

    print(f"## per-sample BatchNorm, N={n}, float32, best of 7 (ms)")
    print("| C x H x W | fwd: mean+var | fwd: group_norm | fwd+bwd: mean+var | "
          "fwd+bwd: group_norm | stats: torch.var | stats: two-pass |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for c, h in ((16, 32), (32, 16), (64, 8)):
        x = torch.randn(n, c, h, h, requires_grad=True)
        w = torch.rand(c, requires_grad=True)
        b = torch.randn(c, requires_grad=True)
        g = torch.randn(n, c, h, h)

        def var_form():
            mean = x.mean((2, 3), keepdim=True)
            var = x.var((2, 3), unbiased=False, keepdim=True)
            return (x - mean) * torch.rsqrt(var + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

        def gn_form():
            return F.group_norm(x, c, w, b, 1e-5)

        def bwd(f):
            return lambda: torch.autograd.grad(f(), (x, w, b), g)

        xd = x.detach()

        def two_pass():
            flat = xd.reshape(n, c, -1)
            dev = flat - flat.mean(2, keepdim=True)
            return (dev * dev).mean(2)

        with torch.no_grad():
            fwd = [best_of(var_form, 7), best_of(gn_form, 7)]
        both = [best_of(bwd(var_form), 7), best_of(bwd(gn_form), 7)]
        stats = [best_of(lambda: xd.var((2, 3), unbiased=False), 7), best_of(two_pass, 7)]
        cells = " | ".join(f"{1e3 * t:.2f}" for t in fwd + both + stats)
        print(f"| {c}x{h}x{h} | {cells} |")


def layer_norm(n=64):
    """The LayerNorm rule's per-sample weight gradient ``sum_t gout * xhat``: ``xhat`` by
    ``F.layer_norm`` against ``(x - mean) * rstd`` from the statistics the forward saved
    (``rules.norm.LayerNormRule.save``), at Swin's, BERT's and ViT's token shapes."""
    import torch.nn.functional as F

    print(f"## LayerNorm weight block, N={n}, float32, median of 101 (ms)")
    print("| tokens x channels | xhat by F.layer_norm | xhat from the saved statistics |")
    print("|---|---|---|")
    for t, c in ((256, 32), (64, 64), (32, 128), (197, 192)):
        x, g = torch.randn(n, t, c), torch.randn(n, t, c)
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, (c,), None, None, 1e-5)

        def recompute():
            return (g * F.layer_norm(x, (c,), None, None, 1e-5)).sum(1)

        def saved():
            return (x - mean).mul_(rstd).mul_(g).sum(1)

        torch.testing.assert_close(recompute(), saved(), rtol=1e-4, atol=1e-4)
        cells = " | ".join(f"{1e3 * median_of(f, 101):.3f}" for f in (recompute, saved))
        print(f"| {t} x {c} | {cells} |")


def lookup(n=64):
    """``SampleFreeRule`` on a Swin relative-position bias ``table[index]`` (viewed,
    permuted, made contiguous, unsqueezed): each sample's table gradient by one batched
    vector-Jacobian product through the whole chain (autograd runs ``index_put`` once per
    sample) against a product to the lookup's output and one ``index_add_``."""
    from torch.autograd.graph import GradientEdge

    print(f"## relative-position table gradients, N={n}, float32, median of 101 (ms)")
    print("| window, heads | through the lookup | to the lookup, index_add_ |")
    print("|---|---|---|")
    for w, h in ((4, 2), (4, 4), (7, 3)):
        S = w * w
        table = torch.randn((2 * w - 1) ** 2, h, requires_grad=True)
        index = torch.randint(0, table.shape[0], (S * S,))
        z = table[index].view(S, S, h).permute(2, 0, 1).contiguous().unsqueeze(0)
        out, look = GradientEdge(z.grad_fn, 0), z.grad_fn
        while look.name() != "IndexBackward0":
            look = look.next_functions[0][0]
        dz = torch.randn(n, 1, h, S, S)

        def through():
            return torch.autograd.grad(out, table, dz, retain_graph=True, is_grads_batched=True)[0]

        def scatter():
            (g,) = torch.autograd.grad(
                out, GradientEdge(look, 0), dz, retain_graph=True, is_grads_batched=True
            )
            return g.new_zeros(n, *table.shape).index_add_(1, index, g)

        torch.testing.assert_close(through(), scatter())
        cells = " | ".join(f"{1e3 * median_of(f, 101):.3f}" for f in (through, scatter))
        print(f"| {w}x{w}, {h} | {cells} |")


def _model(n):
    torch.manual_seed(0)
    return nb201.build_model(nb201.BENCH_ARCH), data.load_cifar10(n)[0]


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
    saved = sizes.BATCH_PASSES_BYTES, sizes.GRAM_DIRECT_BYTES
    res = {k: [] for k in configs}
    try:
        for _ in range(reps):
            for name, (b, d) in configs.items():
                sizes.BATCH_PASSES_BYTES, sizes.GRAM_DIRECT_BYTES = b, d
                t = time.perf_counter()
                fastntk.ntk(m, x, output="trace")
                res[name].append(time.perf_counter() - t)
    finally:
        sizes.BATCH_PASSES_BYTES, sizes.GRAM_DIRECT_BYTES = saved
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
            row.append(
                (
                    best_of(lambda mod=mod, x=x: mod(x).detach()),
                    best_of(lambda y=y, g=g, x=x: torch.autograd.grad(y, x, g, retain_graph=True)),
                )
            )
        (pf, pb), (cf, cb) = row
        print(
            f"| {c}x{h}x{h} | {1e3 * pf:.2f} | {1e3 * cf:.2f} | {1e3 * pb:.2f} | {1e3 * cb:.2f} |"
        )


class _AttnBlock(torch.nn.Module):
    """LayerNorm, nn.MultiheadAttention (self-attention, no weights returned), a head."""

    def __init__(self, e=384, heads=6):
        super().__init__()
        self.ln = torch.nn.LayerNorm(e)
        self.attn = torch.nn.MultiheadAttention(e, heads, batch_first=True)
        self.head = torch.nn.Linear(e, 10)

    def forward(self, x):
        h = self.ln(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((x + a).mean(1))


def mha(n=32, tokens=65):
    """One nn.MultiheadAttention block (E=384, 6 heads): fastntk with its MHA rule
    (rules/attention.py) and with the rule unregistered (the per-module fallback), against
    vmap(jacrev) and one plain forward+backward; "sum" and "trace", best of 3 (s),
    providers interleaved."""
    from fastntk.rules import _RULES

    print(f"## nn.MultiheadAttention block, E=384, 6 heads, {tokens} tokens, N={n}, best of 3 (s)")
    print(
        "| output | fwd+bwd | fastntk auto, MHA rule | auto, per-module fallback | vmap(jacrev) |"
    )
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    m = _AttnBlock().eval()
    x = torch.randn(n, tokens, 384)
    rule = _RULES[torch.nn.MultiheadAttention]

    def fwdbwd():
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    def fallback(output):
        del _RULES[torch.nn.MultiheadAttention]
        try:
            fastntk.ntk(m, x, output=output)
        finally:
            _RULES[torch.nn.MultiheadAttention] = rule

    for output in ("sum", "trace"):
        times = [best_of(fwdbwd)]
        times.append(best_of(lambda: fastntk.ntk(m, x, output=output)))
        times.append(best_of(lambda: fallback(output)))
        times.append(best_of(lambda: fastntk.ntk(m, x, output=output, method="vmap")))
        print(f"| {output} | " + " | ".join(f"{t:.3f}" for t in times) + " |")


DEVICE = "cpu"


def coupled(n=64):
    m, x = _model(n)
    m, x = m.to(DEVICE), x.to(DEVICE)
    print(f"## bn='batch' kernel, NB201, N={n}, {DEVICE} (s, one call each after a warm-up)")
    fastntk.ntk(m, x[:4], bn="batch")
    runs = [("loop", "loop"), ("batched is_grads_batched (vmap)", "vmap")]
    if DEVICE != "cpu":
        runs.append(("auto (batched on a GPU)", "auto"))
    ref = None
    for name, method in runs:
        if DEVICE != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        theta = fastntk.ntk(m, x, bn="batch", method=method)
        if DEVICE != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        ref = theta if ref is None else ref
        err = float((theta - ref).abs().max() / ref.abs().max())
        print(f"{name}: {dt:.2f} s (max rel. difference to the loop {err:.1e})")


def depthwise(n=64):
    """Per-sample weight gradients of convolutions with one (and, to show where it stops
    paying, a few) input channels per group: ``rules.conv``'s forward convolution against
    its patches and grouped strategies, best of 5, N=n."""
    from fastntk.rules import Context, Workspace

    print(f"## per-sample weight gradients with few input channels per group, N={n} (ms)")
    print("| C_in->C_out | groups | k | map | patches+bmm | grouped, chunks | forward conv |")
    print("|---|---|---|---|---|---|---|")
    for ci, co, groups, k, h in [
        (64, 64, 64, 7, 8), (64, 64, 64, 7, 4), (128, 128, 128, 7, 2), (32, 32, 32, 3, 16),
        (3, 16, 1, 3, 32), (16, 16, 1, 3, 32),
    ]:  # fmt: skip
        mod = torch.nn.Conv2d(ci, co, k, padding=k // 2, groups=groups, bias=False)
        x = torch.randn(n, ci, h, h)
        g = torch.randn(n, co, h, h)
        ctx = Context("eval", "torch", Workspace())
        cells = [
            best_of(lambda: conv_rule._patches_weight_grad(mod, ctx, x, g, groups), 5),
            best_of(lambda: conv_rule._grouped_weight_grad(mod, x, g, groups), 5),
        ]
        fwd = "n/a (more than one input channel per group)"
        if ci == groups:
            fwd = f"{1e3 * best_of(lambda: conv_rule._depthwise_weight_grad(mod, x, g, groups), 5):.2f}"
        body = " | ".join(f"{1e3 * t:.2f}" for t in cells)
        print(f"| {ci}->{co} | {groups} | {k} | {h}x{h} | {body} | {fwd} |")


def positions(n=64):
    """A layer applied at T positions: dense per-sample gradients (the conv rule's
    strategy for the shape, or a bmm for tokens) plus their symmetric Gram, against the
    Outer block with positions (``rules.gram_block``'s slabs), best of 5, N=n."""
    from fastntk.rules import Context, Dense, Outer, Workspace, gram_block, outer_pays

    print(f"## Outer blocks with positions vs dense blocks, N={n}, best of 5 (ms)")
    print("| layer | T | p x d | dense: gradients + Gram | Outer with positions | outer_pays |")
    print("|---|---|---|---|---|---|")
    for kind, ci, co, h in [
        ("conv 3x3", 128, 128, 2), ("conv 3x3", 64, 128, 4), ("conv 3x3", 128, 128, 4),
        ("conv 3x3", 64, 64, 8), ("linear", 128, 512, 2), ("linear", 64, 256, 4),
        ("linear", 128, 512, 8),
    ]:  # fmt: skip
        T = h * h
        ctx = Context("eval", "auto", Workspace())
        if kind == "linear":
            u, gout = torch.randn(n, T, ci), torch.randn(n, T, co)
            D = ci

            def dense():
                G = Dense(torch.bmm(gout.transpose(1, 2), u).reshape(n, -1))
                return gram_block(G, G, "auto")

            def outer():
                blk = Outer(gout, u)
                return gram_block(blk, blk, "auto")
        else:
            mod = torch.nn.Conv2d(ci, co, 3, padding=1, bias=False)
            x, g = torch.randn(n, ci, h, h), torch.randn(n, co, h, h)
            D = ci * 9

            def dense():
                G = Dense(conv_rule._weight_grad(mod, ctx, x, g, 1).reshape(n, -1))
                return gram_block(G, G, "auto")

            def outer():
                u = conv_rule.unfold_patches(mod, x).transpose(1, 2)
                blk = Outer(g.reshape(n, co, T).transpose(1, 2), u)
                return gram_block(blk, blk, "auto")

        err = float((dense() - outer()).abs().max() / dense().abs().max())
        assert err < 1e-4, err
        td, to = best_of(dense, 5), best_of(outer, 5)
        print(f"| {kind} {ci}->{co} | {T} | {co}x{D} | {1e3 * td:.2f} | {1e3 * to:.2f} | "
              f"{outer_pays(n, T, co, D)} |")  # fmt: skip


def blocks(n=64, reps=2):
    """``ntk`` "sum" with the Linear rule's cache-sized blocks (4 MiB), without them, and
    with every block at 4 MiB, alternating in one process: medians of 5 per setting and
    round (ms)."""
    import statistics

    from fastntk import rules

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_hf_zoo

    print(f"## block sizes inside ntk(), sum, N={n} (NB201 also 256), medians of 5 (ms)")
    print("| model | N | Linear on tokens capped at 4 MiB (default) | no cap | every block 4 MiB |")
    print("|---|---|---|---|---|")
    cases = [(name, n) for name in ("vit", "bert", "t5", "llama", "resnet", "swin")]
    cases += [("nb201", n), ("nb201", 256)]
    cap0, block0 = rules.CACHE_BLOCK_BYTES, sizes.BLOCK_BYTES
    settings = {"capped": (cap0, block0), "no cap": (2**62, block0), "all 4 MiB": (cap0, 4 << 20)}
    for name, m in cases:
        if name == "nb201":
            model, x = _model(m)
        else:
            model, inputs = bench_hf_zoo.build(name)
            x = inputs(m)
        times: dict[str, list[float]] = {k: [] for k in settings}
        try:
            for _ in range(reps):
                for k, (cap, block) in settings.items():
                    rules.CACHE_BLOCK_BYTES, sizes.BLOCK_BYTES = cap, block
                    f = lambda: fastntk.ntk(model, x, output="sum", progress=False)  # noqa: E731
                    f()
                    ts = []
                    for _ in range(5):
                        t = time.perf_counter()
                        f()
                        ts.append(time.perf_counter() - t)
                    times[k].append(statistics.median(ts))
        finally:
            rules.CACHE_BLOCK_BYTES, sizes.BLOCK_BYTES = cap0, block0
        cells = " | ".join(", ".join(f"{1e3 * t:.0f}" for t in times[k]) for k in settings)
        print(f"| {name} | {m} | {cells} |", flush=True)


if __name__ == "__main__":
    sections = {
        "conv": conv,
        "chunks": chunks,
        "gram": gram,
        "affine": affine,
        "per_sample_bn": per_sample_bn,
        "layer_norm": layer_norm,
        "lookup": lookup,
        "trace": trace,
        "pool": pool,
        "coupled": coupled,
        "mha": mha,
        "depthwise": depthwise,
        "positions": positions,
        "blocks": blocks,
    }
    argv = sys.argv[1:]
    if "--device" in argv:
        i = argv.index("--device")
        DEVICE = argv[i + 1]
        del argv[i : i + 2]
    which = argv or list(sections)
    if any(w in ("-h", "--help") for w in which):
        print(__doc__)
        sys.exit(0)
    unknown = [w for w in which if w not in sections]
    if unknown:
        sys.exit(f"bench_engine_choices.py: unknown section(s) {', '.join(unknown)}; "
                 f"choose from {', '.join(sections)}")  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for w in which:
        sections[w]()
