"""Every engine path against the float64 jacrev oracle (tests/reference.py)."""

from __future__ import annotations

import functools
import gc
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import zoo
from reference import TOL, full_kernel, reduce, rel_err

import fastntk

METHODS = ["layerwise", "vmap", "loop"]
OUTPUTS = ["sum", "trace", "mean", "full", 1, "callable"]

warnings.filterwarnings("ignore", message=".*batching rule.*")


def weights_only(name, p):
    return "weight" in name


@functools.cache
def case(name: str, cross: bool, bn: str = "eval", params: str = "all"):
    m, x1, x2 = zoo.make(name)
    sel = None if params == "all" else weights_only
    ref = full_kernel(m, x1, x2 if cross else None, bn, sel)
    return m, x1, (x2 if cross else None), sel, ref


def _out(output):
    if output == "callable":
        return (lambda out: (out[-1] if isinstance(out, tuple) else out)[:, 0] * 2.0), None
    return output, output


def _expected(ref, output):
    if output == "callable":
        return 4.0 * ref[:, :, 0, 0]
    return reduce(ref, output)


# The layerwise path (rules, fallbacks, deferred sums) in every output mode, with PyTorch
# ops only ("layerwise") and with the C++ extension where auto uses it (symmetric Grams,
# BatchNorm); the torch.func and loop paths share the output handling, so two modes
# suffice there.
ZOO_CASES = [(o, m) for o in OUTPUTS for m in ("layerwise", "auto")] + [
    (o, m) for o in ("sum", "full") for m in ("vmap", "loop")
]


@pytest.mark.parametrize("name", zoo.ZOO)
@pytest.mark.parametrize("output,method", ZOO_CASES)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_zoo_against_oracle(name, output, cross, method):
    m, x1, x2, sel, ref = case(name, cross)
    out, _ = _out(output)
    theta = fastntk.ntk(m, x1, x2, output=out, method=method, dtype=torch.float64)
    expect = _expected(ref, output)
    assert theta.shape == expect.shape
    assert theta.dtype == torch.float64
    assert rel_err(theta, expect) <= TOL[torch.float64]


@pytest.mark.parametrize("name", ["convzoo", "resnet", "nb201", "vit", "tied"])
@pytest.mark.parametrize("method", METHODS)
def test_weights_only_selection(name, method):
    m, x1, x2, sel, ref = case(name, True, "eval", "weights")
    theta = fastntk.ntk(m, x1, x2, output="trace", params=sel, method=method, dtype=torch.float64)
    assert rel_err(theta, reduce(ref, "trace")) <= TOL[torch.float64]


BN_CASES = [(o, m) for o in ("sum", "trace", "full") for m in ("layerwise", "auto")] + [
    ("sum", "vmap"),
    ("full", "loop"),
]


@pytest.mark.parametrize("name", zoo.BN_ZOO)
@pytest.mark.parametrize("bn", ["eval", "batch", "per_sample"])
@pytest.mark.parametrize("output,method", BN_CASES)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_batchnorm_modes(name, bn, output, cross, method):
    m, x1, x2, sel, ref = case(name, cross, bn)
    theta = fastntk.ntk(m, x1, x2, output=output, bn=bn, method=method, dtype=torch.float64)
    assert rel_err(theta, reduce(ref, output)) <= TOL[torch.float64]


def test_batch_mode_matches_te_nas_loop():
    """bn="batch" layerwise (batched one-hot backward) == the per-sample loop in train mode."""
    m, x1, _ = zoo.make("nb201", n=6)
    a = fastntk.ntk(m, x1, bn="batch", dtype=torch.float64)
    b = fastntk.ntk(m, x1, bn="batch", method="loop", dtype=torch.float64)
    assert rel_err(a, b) <= 1e-10
    # and it differs from the eval kernel: the modes are really different kernels
    c = fastntk.ntk(m, x1, bn="eval", dtype=torch.float64)
    assert rel_err(a, c) > 1e-3


@pytest.mark.parametrize("name", ["resnet", "vit", "twice", "tied"])
@pytest.mark.parametrize("output", ["trace", "full"])
@pytest.mark.parametrize("chunk", [2, (3, 3)], ids=["s2", "s3c3"])
def test_chunked_panels(name, output, chunk, monkeypatch):
    """Batches larger than one chunk: panels of rows, column blocks, mirrored triangle."""
    from fastntk.engine import sizes

    monkeypatch.setattr(sizes, "PANEL_BYTES", 1)  # smallest panels: most recomputation
    m, x1, x2 = zoo.make(name, n=5)
    for other in (None, x2):
        ref = reduce(full_kernel(m, x1, other), output)
        theta = fastntk.ntk(m, x1, other, output=output, chunk_size=chunk, dtype=torch.float64)
        assert rel_err(theta, ref) <= TOL[torch.float64]


@pytest.mark.parametrize("name", ["resnet", "vit", "nb201"])
@pytest.mark.parametrize("output", ["sum", "full"])
def test_panels_with_split_parameter_rows(name, output, monkeypatch):
    """Blocks cut into parameter-row ranges (small BLOCK_BYTES), N not a multiple of the
    chunk: every chunk cuts a parameter alike, so the smaller last chunk's blocks meet the
    panel's by key (they were cut by that chunk's own size: mismatched widths)."""
    from fastntk.engine import sizes

    monkeypatch.setattr(sizes, "BLOCK_BYTES", 2000)
    m, x1, x2 = zoo.make(name, n=5)
    for other in (None, x2):
        ref = reduce(full_kernel(m, x1, other), output)
        theta = fastntk.ntk(m, x1, other, output=output, chunk_size=2, dtype=torch.float64)
        assert rel_err(theta, ref) <= TOL[torch.float64]


def test_float32_default_dtype_close_to_oracle():
    m, x1, x2, sel, ref = case("resnet", True)
    theta = fastntk.ntk(m, x1, x2, output="trace")
    assert theta.dtype == torch.float32
    assert rel_err(theta, reduce(ref, "trace")) <= TOL[torch.float32]


@pytest.mark.parametrize("method", ["layerwise", "auto"])
def test_float32_gram_inside_float64_call_is_caught(method, monkeypatch):
    """The float64 tolerance sees a Gram rounded through float32 inside a float64 call
    (the kernel is then about 1e-8 off: the former 1e-6 tolerance let it pass)."""
    from fastntk.engine import gram

    real = gram.gram_block

    def float32_gram(a, b, backend="torch"):
        return real(a, b, backend).float().double()

    m, x1, x2, sel, ref = case("resnet", True)
    expect = reduce(ref, "sum")
    theta = fastntk.ntk(m, x1, x2, method=method, dtype=torch.float64)
    assert rel_err(theta, expect) <= TOL[torch.float64]
    monkeypatch.setattr(gram, "gram_block", float32_gram)
    theta = fastntk.ntk(m, x1, x2, method=method, dtype=torch.float64)
    assert theta.dtype == torch.float64
    assert rel_err(theta, expect) > TOL[torch.float64]


def test_symmetric_kernel_is_symmetric_and_psd():
    m, x1, _ = zoo.make("nb201", n=6)
    theta = fastntk.ntk(m, x1, dtype=torch.float64)
    assert torch.equal(theta, theta.T) or rel_err(theta, theta.T) < 1e-14
    assert torch.linalg.eigvalsh(theta).min() > -1e-9 * theta.diagonal().max()


def test_single_sample_and_odd_widths():
    torch.manual_seed(3)
    m = torch.nn.Sequential(torch.nn.Linear(97, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
    x = torch.randn(1, 97)
    theta = fastntk.ntk(m, x, output="full", dtype=torch.float64)
    assert theta.shape == (1, 1, 5, 5)
    assert rel_err(theta, full_kernel(m, x)) <= TOL[torch.float64]


def test_custom_rule_registration():
    """A user rule for zoo.Scale replaces the fallback and is exact."""
    from fastntk.rules import Dense, GramRule

    class ScaleMul(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 4))

        def forward(self, x):
            return x * self.w

    @fastntk.register_gram_rule(ScaleMul)
    class ScaleMulRule(GramRule):
        # y = x * w elementwise: dw_i = g_i * x_i
        param_names = ("w",)

        def save(self, module, args, kwargs, output, ctx):
            return args[0]

        def grad_rows(self, module, x, gout, name, r0, r1):
            return Dense((gout * x)[:, r0:r1])

    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(3, 4), ScaleMul(), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )
    x = torch.randn(5, 3)
    paths = {p.name: p.path for p in fastntk.explain(m, x).params}
    assert paths["1.w"] == "rule:ScaleMulRule"
    theta = fastntk.ntk(m, x, output="trace", dtype=torch.float64)
    assert rel_err(theta, reduce(full_kernel(m, x), "trace")) <= TOL[torch.float64]


def test_layer_norm_rule_reads_the_saved_statistics(monkeypatch):
    """The LayerNorm rule takes the forward's mean and 1/std from the output's node where it
    is the LayerNorm of the call's input (the engine hands rules detached inputs: the same
    data), and recomputes xhat otherwise (an output another op made): the same per-sample
    gradients either way, also over two leading dims; inside ``ntk`` it reads them."""
    from fastntk.rules import norm

    rule = norm.LayerNormRule()
    ln = nn.LayerNorm(6).double()
    x = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, 6, dtype=torch.float64)
    saved = rule.save(ln, (x.detach(),), {}, ln(x), None)
    other = rule.save(ln, (x.detach(),), {}, ln(x) * 1.0, None)
    assert saved[1] is not None and saved[1].shape == (4, 3, 1) and other[1:] == (None, None)
    xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True)
                                                       + ln.eps)  # fmt: skip
    for name, want in (("weight", (g * xhat).sum(1)), ("bias", g.sum(1))):
        for s in (saved, other):
            blk = rule.grad_rows(ln, s, g, name, 0, 6)
            torch.testing.assert_close(blk.dense(), want.detach(), rtol=1e-12, atol=1e-12)

    read = []
    real = norm.LayerNormRule.save

    def spy(self, module, args, kwargs, output, ctx):
        out = real(self, module, args, kwargs, output, ctx)
        read.append(out[1] is not None)
        return out

    monkeypatch.setattr(norm.LayerNormRule, "save", spy)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    theta = fastntk.ntk(m, x, output="trace", dtype=torch.float64)
    assert rel_err(theta, reduce(full_kernel(m, x), "trace")) <= TOL[torch.float64]
    assert read and all(read), read


def test_explain_reports_paths_and_memory():
    m, x1, _ = zoo.make("vit")
    ex = fastntk.explain(m, x1)
    paths = {p.name: p.path for p in ex.params}
    assert paths["patch.weight"] == "rule:ConvRule"
    assert paths["ln1.weight"] == "rule:LayerNormRule"
    assert paths["attn.in_proj_weight"] == "rule:MultiheadAttentionRule"
    # MHA applies out_proj's weight itself (F.linear): its rule takes it
    assert (
        paths["attn.out_proj.weight"] == "rule:MultiheadAttentionRule (used inside 'attn''s call)"
    )
    assert paths["cls"].startswith("rule:BroadcastRule") and paths["pos"].startswith("rule:Broad")
    assert ex.kernel_bytes == 4 * 4 * 4
    assert "patch.weight" in str(ex) and "memory estimate" in str(ex)
    m, x1, _ = zoo.make("nb201")
    assert all(p.path == "coupled" for p in fastntk.explain(m, x1, bn="batch").params)


class BigMaps(nn.Module):
    """Output maps of >= 256 positions: the grouped-convolution strategy of the conv rule."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 4, padding="same", groups=2, bias=False)  # asymmetric padding
        self.c = nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="reflect", groups=4)
        self.d = nn.Conv1d(4, 3, 5, padding=2)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        h = torch.tanh(self.c(h))  # (n, 4, 16, 16)
        h = torch.tanh(self.d(h.flatten(2)))  # (n, 3, 256)
        return self.fc(h.mean(2))


def test_large_maps_grouped_strategy():
    torch.manual_seed(1)
    m = BigMaps()
    x1, x2 = torch.randn(3, 2, 16, 16), torch.randn(2, 2, 16, 16)
    ref = full_kernel(m, x1, x2)
    theta = fastntk.ntk(m, x1, x2, output="full", dtype=torch.float64)
    assert rel_err(theta, ref) <= TOL[torch.float64]
    # column blocks that split groups (rows of 1 output channel)
    theta = fastntk.ntk(m, x1, x2, output="trace", dtype=torch.float64, chunk_size=(8, 1))
    assert rel_err(theta, reduce(ref, "trace")) <= TOL[torch.float64]


@pytest.mark.parametrize("chunk", [None, 2])
def test_kernel_is_detached(chunk):
    """The kernel never carries autograd history (first layer fed by a grad-requiring input)."""
    m, x1, _ = zoo.make("mlp", n=5)
    x = x1.clone().requires_grad_(True)
    theta = fastntk.ntk(m, x, chunk_size=chunk)
    assert not theta.requires_grad and theta.grad_fn is None
    assert rel_err(theta, reduce(full_kernel(m, x1), "sum")) <= TOL[torch.float32]


@pytest.mark.parametrize("name", ["convzoo", "nb201", "twice"])
@pytest.mark.parametrize("direct", [True, False], ids=["own-gemm", "buffered"])
def test_gram_blocks_direct_and_buffered(name, direct, monkeypatch):
    """Dense blocks contracted one by one, or concatenated into the shared buffer first."""
    from fastntk.engine import sizes

    monkeypatch.setattr(sizes, "GRAM_DIRECT_BYTES", 0 if direct else 2**62)
    m, x1, x2, sel, ref = case(name, True)
    for output in ("sum", "trace"):
        theta = fastntk.ntk(m, x1, x2, output=output, dtype=torch.float64)
        assert rel_err(theta, reduce(ref, output)) <= TOL[torch.float64]


@pytest.mark.parametrize("name", ["convzoo", "resnet", "nb201", "twice"])
@pytest.mark.parametrize("batched", [True, False], ids=["all-logits", "logit-by-logit"])
def test_trace_batched_and_streamed_logits(name, batched, monkeypatch):
    """Both ways of handling several logits: all at once (shared patches), or streamed."""
    from fastntk.engine import sizes

    monkeypatch.setattr(sizes, "BATCH_PASSES_BYTES", 2**40 if batched else 0)
    m, x1, x2, sel, ref = case(name, True)
    for output in ("trace", "mean"):
        theta = fastntk.ntk(m, x1, x2, output=output, dtype=torch.float64)
        assert rel_err(theta, reduce(ref, output)) <= TOL[torch.float64]


# conv strategy -> (GROUPED_MIN_T, GROUPED_CHUNK_BYTES, DEPTHWISE_FORWARD, OUTER_COST_FACTOR)
CONV_STRATEGIES = {
    "grouped-1-sample-chunks": (1, 1, False, float("inf")),
    "grouped-one-chunk": (1, 2**40, False, float("inf")),
    "patches": (10**9, 2**40, False, float("inf")),
    "depthwise-forward": (10**9, 2**40, True, float("inf")),
    "outer-positions": (10**9, 2**40, True, 0.0),
}


def force_conv_strategy(monkeypatch, strategy):
    from fastntk import rules
    from fastntk.rules import conv

    min_t, chunk_bytes, depthwise, outer = CONV_STRATEGIES[strategy]
    monkeypatch.setattr(conv, "GROUPED_MIN_T", min_t)
    monkeypatch.setattr(conv, "GROUPED_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(conv, "DEPTHWISE_FORWARD", depthwise)
    monkeypatch.setattr(rules, "OUTER_COST_FACTOR", outer)


@pytest.mark.parametrize("name", ["convzoo", "nb201", "resnet", "conv1d3d"])
@pytest.mark.parametrize("strategy", list(CONV_STRATEGIES))
@pytest.mark.parametrize("method", ["layerwise", "auto"])
def test_conv_strategies_and_reused_blocks(name, strategy, method, monkeypatch):
    """Every per-sample conv strategy (grouped convolution in sample chunks of any size,
    strided patches, the depthwise forward convolution, Outer blocks with positions that
    form no gradient), with every dense block written into the workspace
    (GRAM_DIRECT_BYTES = 0), in self and cross kernels and in both trace layouts."""
    from fastntk.engine import sizes

    force_conv_strategy(monkeypatch, strategy)
    monkeypatch.setattr(sizes, "GRAM_DIRECT_BYTES", 0)
    m, x1, x2, sel, ref = case(name, True)
    for output in ("sum", "trace"):
        for other in (x2, None):
            expect = reduce(ref if other is not None else full_kernel(m, x1), output)
            theta = fastntk.ntk(m, x1, other, output=output, method=method, dtype=torch.float64)
            assert rel_err(theta, expect) <= TOL[torch.float64]


@pytest.mark.parametrize("name", ["vit", "convzoo", "conv1d3d", "twice"])
@pytest.mark.parametrize("outer", [0.0, float("inf")], ids=["outer-positions", "dense"])
def test_outer_blocks_with_positions(name, outer, monkeypatch):
    """Layers applied at several positions (tokens, convolution windows) as Outer blocks
    with positions, or dense, in every output mode, cross, in chunks (the blocks regrouped
    into panels, their Gram in slabs of one sample), and the exact diagonal."""
    from fastntk import rules

    monkeypatch.setattr(rules, "OUTER_COST_FACTOR", outer)
    monkeypatch.setattr(rules, "OUTER_SLAB_BYTES", 1)
    m, x1, x2, sel, ref = case(name, True)
    own = full_kernel(m, x1)
    for output in ("sum", "trace", "full"):
        theta = fastntk.ntk(m, x1, x2, output=output, dtype=torch.float64)
        assert rel_err(theta, reduce(ref, output)) <= TOL[torch.float64]
        theta = fastntk.ntk(m, x1, output=output, dtype=torch.float64, chunk_size=2)
        assert rel_err(theta, reduce(own, output)) <= TOL[torch.float64]
        diag = fastntk.ntk_diag(m, x1, output=output, dtype=torch.float64)
        expect = reduce(own, output)
        expect = expect.diagonal(0, 0, 1)  # (K, K, n) or (n,)
        expect = expect.permute(2, 0, 1) if output == "full" else expect
        assert rel_err(diag, expect) <= TOL[torch.float64]


def test_workspace_reuses_memory():
    """Rules' temporaries and streamed blocks come from reused buffers, not new memory."""
    from fastntk.rules import Workspace

    ws = Workspace()
    like = torch.zeros(1, dtype=torch.float64)
    a = ws.get("t", (4, 5), like)
    b = ws.get("t", (2, 3), like)  # smaller: a view of the same memory
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 3) and b.is_contiguous()
    c = ws.get("t", (10, 10), like)  # bigger: grown
    assert c.numel() == 100 and ws.get("u", (3,), like).data_ptr() != c.data_ptr()
    assert ws.get("t", (3,), torch.zeros(1)).dtype == torch.float32  # dtype follows ``like``


@pytest.mark.parametrize("bn", ["eval", "per_sample"])
@pytest.mark.parametrize("params", ["all", "weights"])
def test_batchnorm_fused_blocks(bn, params, monkeypatch):
    """The one-pass BatchNorm blocks of auto (C++ op) hand the second parameter its block
    from the first computation, and keep nothing for a parameter not selected."""
    from fastntk import _ext
    from fastntk.rules import norm

    if not _ext.available():
        pytest.skip(f"C++ extension not built: {_ext.why_not()}")
    seen = []
    orig = norm.BatchNormRule._fused

    def spy(self, module, saved, g, name, r0, r1):
        out = orig(self, module, saved, g, name, r0, r1)
        seen.append((name, dict(saved.memo)))
        return out

    monkeypatch.setattr(norm.BatchNormRule, "_fused", spy)
    m, x1, x2, sel, ref = case("resnet", True, bn, params)
    theta = fastntk.ntk(m, x1, x2, output="trace", bn=bn, params=sel, dtype=torch.float64)
    assert rel_err(theta, reduce(ref, "trace")) <= TOL[torch.float64]
    assert seen
    if params == "weights":  # no bias block computed for later, ever
        assert all(not memo for _, memo in seen)
    else:  # the weight requests leave the bias blocks, which the bias requests take
        assert any(memo for name, memo in seen if name == "weight")
        assert all(k[0] == "bias" for _, memo in seen for k in memo)
        assert not seen[-1][1]  # all taken


class Broadcasts(nn.Module):
    """Parameters used outside module calls: a class token expanded over the batch, a
    position embedding and a scaled shift added (rules.nodes.BroadcastRule), and one used twice
    (the exact fallback)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, 3, 4))
        self.shift = nn.Parameter(torch.randn(1, 3, 1))
        self.scale = nn.Parameter(torch.randn(1, 1, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x: (n, 2, 4)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.fc(x)], 1) + self.pos
        h = torch.add(torch.tanh(h), self.shift, alpha=0.5)
        h = h * self.scale + self.scale
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("output", ["sum", "trace", "full"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_broadcast_parameters(output, chunk):
    torch.manual_seed(5)
    m = Broadcasts()
    x1, x2 = torch.randn(3, 2, 4), torch.randn(2, 2, 4)
    paths = {p.name: p.path for p in fastntk.explain(m, x1).params}
    assert all(paths[p].startswith("rule:BroadcastRule") for p in ("cls", "pos", "shift"))
    assert paths["scale"].startswith("fallback:model")  # used twice: the exact fallback
    for other in (x2, None):
        ref = reduce(full_kernel(m, x1, other), output)
        for method in ("layerwise", "auto"):
            theta = fastntk.ntk(
                m, x1, other, output=output, method=method, chunk_size=chunk, dtype=torch.float64
            )
            assert rel_err(theta, ref) <= TOL[torch.float64]
    sel = ["pos", "cls"]  # only broadcast parameters selected: no fallback at all
    theta = fastntk.ntk(m, x1, output="trace", params=sel, dtype=torch.float64)
    assert (
        rel_err(theta, reduce(full_kernel(m, x1, None, "eval", sel), "trace")) <= TOL[torch.float64]
    )


class _Acc:
    """An AccumulateGrad stand-in: the leaf a parameter's gradient flows into."""

    def __init__(self, variable):
        self.variable = variable


class _Wrappers:
    """Python objects for graph nodes made on each access, recycled once nothing else holds
    them: what CPython's allocator does with the temporary node objects of torch 2.11 (an
    id freed with one node comes back for another)."""

    def __init__(self):
        self.pool = []

    def of(self, real):
        for w in reversed(self.pool):  # the most recently made first, as a free list
            if sys.getrefcount(w) <= 3:  # the pool, the loop variable, getrefcount's argument
                w.real = real
                return w
        w = _Wrapper(self, real)
        self.pool.append(w)
        return w


class _Wrapper:
    def __init__(self, wrappers, real):
        self.wrappers, self.real = wrappers, real

    @property
    def next_functions(self):
        return tuple((c if isinstance(c, _Acc) else self.wrappers.of(c), 0) for c in self.real)


def test_graph_walk_survives_recycled_node_objects():
    """y -> A -> B -> W and y -> C -> D -> W: both uses of W are found although the node
    objects are recycled (torch 2.11 made MHA's out_proj look unused and a weight used
    twice look used once: silently wrong kernels, before the walker kept its nodes)."""
    from types import SimpleNamespace

    from fastntk.engine import graph

    w = torch.nn.Parameter(torch.randn(2))
    acc = _Acc(w)
    wrappers = _Wrappers()
    root = [[[acc]], [[acc]]]  # each node: the list of its children
    y = SimpleNamespace(grad_fn=wrappers.of(root))
    uses = graph.param_consumers(y, {"w": w})
    assert len(uses["w"]) == 2
    assert len(wrappers.pool) >= 5  # every node had its own object while the walk held it


@pytest.mark.parametrize("output", ["sum", "trace"])
def test_a_call_leaves_no_tensor_in_a_reference_cycle(output):
    """A call's activations are freed when it returns, not when Python's cyclic garbage
    collector next runs (which does not count tensor memory): a recursive closure in the
    engine's argument flattening and a probe holding a bound method of its strategy were
    such cycles."""
    m, x1, _ = zoo.make("nb201", n=4)
    fastntk.ntk(m, x1, output=output)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        fastntk.ntk(m, x1, output=output)
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage]
        tensors = sum(isinstance(o, torch.Tensor) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    assert tensors == 0, sorted(set(cyclic))
