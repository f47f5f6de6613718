"""Node rules (``fastntk.rules.nodes``): parameters that no module rule serves, read off the
one autograd node that uses them, held to the float64 oracle.

Each model below is written with plain tensor ops, as third-party code writes them (a
layer scale, RMSNorm, a channels-first LayerNorm, HF's ``Conv1D``, a ``Linear`` on rows
that merge the samples with their tokens), so before node rules every one of these
parameters took a torch.func fallback. ``explain`` must name the node rule, and every
output mode, a cross-kernel, a chunked call and the BatchNorm modes must match the oracle.
The layouts a node rule cannot serve (rows merged token-major, a view that reorders the
parameter) must stay on the exact fallback.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import TOL, full_kernel, reduce, rel_err

import fastntk
from fastntk.rules import nodes

TOL64 = TOL[torch.float64]
C, T = 4, 3  # channels and tokens of the models' inputs


class LayerScale(nn.Module):
    """``gamma * x`` over (n, T, C) tokens, and a bias added by hand."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, C)
        self.gamma = nn.Parameter(torch.randn(C))
        self.beta = nn.Parameter(torch.randn(1, 1, C))

    def forward(self, x):
        return torch.tanh(self.gamma * self.fc(x) + self.beta).flatten(1)


class RMSNorm(nn.Module):
    """Llama's RMSNorm, as written there: ``weight * x / rms(x)``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, C)
        self.weight = nn.Parameter(torch.randn(C))

    def forward(self, x):
        h = self.fc(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (self.weight * h).flatten(1)


class ChannelsFirstNorm(nn.Module):
    """ConvNeXt's two channels-first LayerNorms: ``F.layer_norm`` on a permuted tensor,
    and ``w[:, None, None] * xhat + b[:, None, None]`` written out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, C, 3, padding=1)
        self.ln_w, self.ln_b = nn.Parameter(torch.randn(C)), nn.Parameter(torch.randn(C))
        self.w, self.b = nn.Parameter(torch.randn(C)), nn.Parameter(torch.randn(C))
        self.head = nn.Linear(C * 9, 2)

    def forward(self, x):
        h = self.conv(x)
        h = F.layer_norm(h.permute(0, 2, 3, 1), (C,), self.ln_w, self.ln_b).permute(0, 3, 1, 2)
        u = h.mean(1, keepdim=True)
        s = (h - u).pow(2).mean(1, keepdim=True)
        h = (h - u) / torch.sqrt(s + 1e-6)
        h = self.w[:, None, None] * h + self.b[:, None, None]
        return self.head(torch.tanh(h).flatten(1))


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: ``addmm(bias, x.view(-1, nx), weight)``."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


class GPT2Block(nn.Module):
    """Two ``Conv1D`` layers on (n, T, C) tokens, then one on (n, C) rows."""

    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj, self.out = Conv1D(C, 2 * C), Conv1D(2 * C, C), Conv1D(C, 2)

    def forward(self, x):
        h = x + self.c_proj(torch.tanh(self.c_fc(x)))
        return self.out(h.mean(1))


class Merged(nn.Module):
    """A ``Linear`` on rows merging samples and tokens: ``(n, T, C) -> (n·T, C)``, in
    sample-major order (Swin's windows) or token-major (``x.transpose(0, 1)``: no node
    rule, the samples' rows interleave); and ``x @ W`` / ``x @ W.t()`` on tokens."""

    def __init__(self, order):
        super().__init__()
        self.order = order
        self.lin = nn.Linear(C, C)
        self.W = nn.Parameter(torch.randn(C, C) / 2)
        self.V = nn.Parameter(torch.randn(C, C) / 2)
        self.head = nn.Linear(C * T, 2)

    def forward(self, x):
        n = x.shape[0]
        if self.order == "sample-major":
            h = self.lin(x.reshape(n * T, C)).reshape(n, T, C)
        else:
            h = self.lin(x.transpose(0, 1).reshape(T * n, C)).reshape(T, n, C).transpose(0, 1)
        h = torch.tanh(h) @ self.W
        h = torch.tanh(h) @ self.V.t()
        return self.head(h.flatten(1))


class Shifts(nn.Module):
    """``x - p`` and ``p - 2 * x`` (``torch.sub(p, x, alpha=2)``), and a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.p = nn.Parameter(torch.randn(C, 1, 1))
        self.q = nn.Parameter(torch.randn(1, C, 3, 3))
        self.head = nn.Linear(C * 9, 2)

    def forward(self, x):
        h = self.bn(self.conv(x)) - self.p
        h = torch.sub(self.q, torch.tanh(h), alpha=2)
        return self.head(h.flatten(1))


class Windows(nn.Module):
    """Swin's window attention, written out: 2·S tokens per sample cut into 2 windows of
    S, each window's scores (n·2, h, S, S) plus a relative-position bias looked up in a
    table, (1, h, S, S), and (``shifted``) a constant mask of the windows' shape first;
    softmax (the saved tensor whose rows the probe compares), values. ``order``: the
    windows sample-major (as Swin's ``window_partition``), or window-major (no node rule:
    a sample's rows are not one block); ``witness=False``: the scores go to a matmul, no
    node after the add saves its rows (no node rule either)."""

    S, H = 3, 2

    def __init__(self, order="sample-major", shifted=False, witness=True):
        super().__init__()
        S, H = self.S, self.H
        self.order, self.witness = order, witness
        self.table = nn.Parameter(torch.randn(2 * S - 1, H) / 2)
        idx = torch.arange(S)
        self.register_buffer("index", (idx[:, None] - idx[None, :] + S - 1).flatten())
        self.register_buffer("mask", torch.randn(2, 1, S, S) if shifted else None)
        self.qk = nn.Linear(C, 2 * H * C)
        self.head = nn.Linear(2 * S * H * C, 2)

    def forward(self, x):  # x: (n, 2S, C)
        n, S, H = x.shape[0], self.S, self.H
        w = x.reshape(n, 2, S, C)
        w = w.reshape(n * 2, S, C) if self.order == "sample-major" else \
            w.transpose(0, 1).reshape(2 * n, S, C)  # fmt: skip
        q, k = self.qk(w).reshape(-1, S, 2, H, C).permute(2, 0, 3, 1, 4)  # (-1, H, S, C)
        bias = self.table[self.index].view(S, S, H).permute(2, 0, 1).contiguous().unsqueeze(0)
        if self.mask is not None:
            bias = bias + self.mask.repeat(n, 1, 1, 1)
        scores = q @ k.transpose(-1, -2) + bias
        a = torch.softmax(scores, -1) if self.witness else scores
        h = a @ q
        h = h.reshape(n, 2, H, S, C) if self.order == "sample-major" else \
            h.reshape(2, n, H, S, C).transpose(0, 1)  # fmt: skip
        return self.head(torch.tanh(h).flatten(1))


def _windows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2 * Windows.S, C, generator=g, dtype=torch.float64)


def _tokens(n, seed):
    return torch.randn(n, T, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)


# name -> (model, inputs, {parameter: the node rule explain must name})
ZOO = {
    "layer-scale": (LayerScale, _tokens, {"gamma": "ScaleRule", "beta": "BroadcastRule"}),
    "rmsnorm": (RMSNorm, _tokens, {"weight": "ScaleRule"}),
    "channels-first-norm": (ChannelsFirstNorm, _images, {
        "ln_w": "LayerNormNodeRule", "ln_b": "LayerNormNodeRule", "w": "ScaleRule",
        "b": "BroadcastRule"}),
    "conv1d": (GPT2Block, _tokens, {
        f"{m}.{p}": "MatmulRule" for m in ("c_fc", "c_proj", "out") for p in ("weight", "bias")}),
    "merged-sample-major": (lambda: Merged("sample-major"), _tokens, {
        "lin.weight": "MatmulRule", "lin.bias": "MatmulRule", "W": "MatmulRule",
        "V": "MatmulRule"}),
    "merged-token-major": (lambda: Merged("token-major"), _tokens, {
        "lin.weight": "fallback", "lin.bias": "fallback", "W": "MatmulRule",
        "V": "MatmulRule"}),
    "shifts": (Shifts, _images, {"p": "BroadcastRule", "q": "BroadcastRule"}),
    "windows": (Windows, _windows, {"table": "SampleFreeRule", "qk.weight": "MatmulRule"}),
    "windows-shifted": (lambda: Windows(shifted=True), _windows, {"table": "SampleFreeRule"}),
    "windows-window-major": (lambda: Windows("window-major"), _windows, {"table": "fallback"}),
    "windows-no-witness": (lambda: Windows(witness=False), _windows, {"table": "fallback"}),
}  # fmt: skip


def _model(name):
    torch.manual_seed(0)
    make, inputs, expected = ZOO[name]
    return make().double(), inputs, expected


@pytest.mark.parametrize("name", list(ZOO))
def test_explain_names_the_node_rule(name):
    model, inputs, expected = _model(name)
    paths = {p.name: p.path for p in fastntk.explain(model, inputs(5, 1)).params}
    for pname, rule in expected.items():
        want = rule if rule.startswith("fallback") else f"rule:{rule}"
        assert paths[pname].startswith(want), (pname, paths[pname])


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("chunk", [None, 2])
def test_node_rules_match_the_oracle(name, chunk):
    """Every output mode, a cross-kernel, "auto" and "layerwise", one chunk and chunks of
    two (the last one smaller: its nodes' rows per sample are found again)."""
    model, inputs, _ = _model(name)
    x1, x2 = inputs(5, 1), inputs(3, 2)
    full = full_kernel(model, x1)
    cross = full_kernel(model, x1, x2)
    for method in ("auto", "layerwise"):
        for output in ("sum", "trace", "full"):
            theta = fastntk.ntk(model, x1, output=output, method=method, chunk_size=chunk,
                                dtype=torch.float64)  # fmt: skip
            assert rel_err(theta, reduce(full, output)) <= TOL64, (method, output)
        theta = fastntk.ntk(model, x1, x2, method=method, chunk_size=chunk, dtype=torch.float64)
        assert rel_err(theta, reduce(cross, "sum")) <= TOL64, (method, "cross")


@pytest.mark.parametrize("bn", ["per_sample", "batch"])
def test_node_rules_under_batchnorm_modes(bn):
    model, inputs, _ = _model("shifts")
    x = inputs(5, 1)
    theta = fastntk.ntk(model, x, output="trace", bn=bn, dtype=torch.float64)
    assert rel_err(theta, reduce(full_kernel(model, x, bn=bn), "trace")) <= TOL64


def test_node_rule_alone_and_in_the_sketch(monkeypatch):
    """Only node-rule parameters selected (no fallback at all); the sketch hashes the same
    per-sample gradients whichever path computes them, so with node rules it equals the
    sketch the torch.func fallback gives (node rules switched off)."""
    model, inputs, _ = _model("conv1d")
    x = inputs(4, 1)
    sel = ["c_fc.weight", "out.bias"]
    theta = fastntk.ntk(model, x, params=sel, dtype=torch.float64)
    assert rel_err(theta, reduce(full_kernel(model, x, params=sel), "sum")) <= TOL64
    sketch = fastntk.ntk_sketch(model, x, sketch_dim=64, seed=3, dtype=torch.float64)
    monkeypatch.setattr(nodes, "find", lambda use, n: None)  # no node rules
    assert fastntk.explain(model, x).params[0].path.startswith("fallback:module")
    fallback = fastntk.ntk_sketch(model, x, sketch_dim=64, seed=3, dtype=torch.float64)
    assert rel_err(sketch, fallback) <= TOL64


def test_a_parameter_through_a_sample_free_chain():
    """A position embedding looked up and permuted, then added; a parameter permuted (a
    view that reorders its elements), then multiplied: ``SampleFreeRule`` pulls each
    sample's gradient back through the chain. A chain that a batched tensor joins before
    any add or multiply (``torch.cat``) has no node rule: the fallback serves it."""

    class Chains(nn.Module):
        def __init__(self, mixed):
            super().__init__()
            self.mixed = mixed
            self.pos = nn.Embedding(8, C)
            self.p = nn.Parameter(torch.randn(C, T))
            self.q = nn.Parameter(torch.randn(T, C))

        def forward(self, x):
            h = x + self.pos(torch.arange(T)).unsqueeze(0)
            h = torch.tanh(h * self.p.permute(1, 0))
            q = self.q.exp()
            if self.mixed:
                return torch.cat([h, q.expand(x.shape[0], T, C)], -1).flatten(1)
            return (h + q).flatten(1)

    for mixed in (False, True):
        torch.manual_seed(0)
        model = Chains(mixed).double()
        x1, x2 = _tokens(4, 1), _tokens(3, 2)
        paths = {p.name: p.path for p in fastntk.explain(model, x1).params}
        assert paths["pos.weight"].startswith("rule:SampleFreeRule"), paths
        assert paths["p"].startswith("rule:SampleFreeRule"), paths
        assert paths["q"].startswith("fallback" if mixed else "rule:SampleFreeRule"), paths
        for output in ("trace", "full"):
            theta = fastntk.ntk(model, x1, output=output, dtype=torch.float64)
            assert rel_err(theta, reduce(full_kernel(model, x1), output)) <= TOL64
        theta = fastntk.ntk(model, x1, x2, chunk_size=2, dtype=torch.float64)
        assert rel_err(theta, reduce(full_kernel(model, x1, x2), "sum")) <= TOL64


def test_node_rule_parameters_are_roots_only_where_needed(monkeypatch):
    """A node rule's node must run in the backward. Where another of its inputs leads to
    the backward's roots (the input, a first layer's parameters), it runs anyway, and its
    parameter is no root: its summed gradient is not computed. Where it has no such input
    (``f @ W`` with ``f`` from a frozen extractor, computed without grad), its parameter
    stays a root; the next node (``h @ V``) reaches W, so V is none. Held to the oracle
    both ways."""
    from fastntk.engine import capture

    settled = []
    real = capture.Capture.settle_node_roots

    def spy(self, consumers, xp):
        before = (len(self.node_roots), len(self.roots))
        real(self, consumers, xp)
        settled.append((before[0], len(self.roots) - before[1]))

    monkeypatch.setattr(capture.Capture, "settle_node_roots", spy)

    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(C, C) / 2)
            self.V = nn.Parameter(torch.randn(C, C) / 2)

        def forward(self, x):  # (n, T, C); features of a frozen extractor, then a head
            with torch.no_grad():
                f = torch.sin(x)
            h = torch.tanh(f @ self.W)
            return (torch.tanh(h) @ self.V).flatten(1)

    torch.manual_seed(0)
    for model, added in ((_model("conv1d")[0], 0), (Frozen().double(), 1)):
        x = _tokens(4, 1)
        settled.clear()
        paths = {p.name: p.path for p in fastntk.explain(model, x).params}
        assert all(path.startswith("rule:MatmulRule") for path in paths.values()), paths
        theta = fastntk.ntk(model, x, output="trace", dtype=torch.float64)
        assert rel_err(theta, reduce(full_kernel(model, x), "trace")) <= TOL64
        assert settled[-1] == (len(paths), added), settled


def test_lookups_scatter_their_rows(monkeypatch):
    """A sample-free subgraph that starts by looking up rows of the parameter (``p[idx]``
    with a 2-D index holding negative and repeated entries; ``nn.Embedding`` with a
    ``padding_idx`` among its indices; a plain view first, which is no lookup) is pulled
    back to the lookup's output and scattered into the table's rows
    (``nodes._lookup``): held to the oracle, and each of the three recognised as it is."""

    class Lookups(nn.Module):
        def __init__(self):
            super().__init__()
            self.tab = nn.Parameter(torch.randn(5, C))
            self.emb = nn.Embedding(6, C, padding_idx=2)
            self.flat = nn.Parameter(torch.randn(2 * C))
            self.register_buffer("idx", torch.tensor([[0, -1, 3], [3, 1, -5]]))

        def forward(self, x):  # x: (n, T, C)
            h = x + self.tab[self.idx].sum(0)  # (T, C), rows 0, 4, 3 and 3, 1, 0
            h = h * self.emb(torch.tensor([2, 5, 2])).tanh()  # padding rows
            h = h + self.flat.view(2, C)[torch.tensor([1, 0, 1])]  # a view, then a lookup
            return torch.tanh(h).flatten(1)

    found = []

    def spy(use):
        out = real(use)
        found.append((use.param.shape, out is not None))
        return out

    real = nodes._lookup
    monkeypatch.setattr(nodes, "_lookup", spy)
    torch.manual_seed(0)
    model = Lookups().double()
    x1, x2 = _tokens(4, 1), _tokens(3, 2)
    paths = {p.name: p.path for p in fastntk.explain(model, x1).params}
    assert all(paths[q].startswith("rule:SampleFreeRule") for q in ("tab", "emb.weight", "flat"))
    assert sorted(set(found)) == [
        (torch.Size([5, C]), True),
        (torch.Size([6, C]), True),
        (torch.Size([2 * C]), False),
    ]
    for output in ("trace", "full"):
        theta = fastntk.ntk(model, x1, output=output, dtype=torch.float64)
        assert rel_err(theta, reduce(full_kernel(model, x1), output)) <= TOL64, output
    theta = fastntk.ntk(model, x1, x2, chunk_size=2, dtype=torch.float64)
    assert rel_err(theta, reduce(full_kernel(model, x1, x2), "sum")) <= TOL64


def test_sample_major_judges_the_rows():
    rows = torch.arange(12.0).reshape(6, 2)  # 3 samples x 1 row... as 2 rows per sample
    # n = 3 samples, T = 2: the last sample's rows are the last 2
    assert nodes.sample_major(rows, rows[4:], 3, 1, 1e-12)
    assert not nodes.sample_major(rows, rows[[1, 3]], 3, 1, 1e-12)  # token-major rows
    assert not nodes.sample_major(rows, rows[4:5], 3, 1, 1e-12)  # rows per sample differ
    # a chunk no larger than the probe: its rows are the probe's first
    assert nodes.sample_major(rows, torch.cat([rows, rows[:2] + 1]), 3, 4, 1e-12)
