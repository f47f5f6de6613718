"""nn.MultiheadAttention's rule (fastntk/rules/attention.py) against the float64 oracle.

Layouts (batch_first either way), self- and cross-attention (query, key, value three
different tensors), masks (key padding, a float attention mask, causal), no biases, every
output mode, parameter selection; the calls the rule declines (attention weights
returned, dropout in training mode) and the modules it does not cover (kdim != embed_dim,
bias_k) take the exact per-module fallback, and say so in explain().
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from reference import TOL, full_kernel, reduce, rel_err

import fastntk

TOL64 = TOL[torch.float64]


class Block(nn.Module):
    def __init__(self, e=8, heads=2, batch_first=True, cross=False, mask=None, bias=True,
                 need_weights=False, use_weights=False, kdim=None, add_bias_kv=False,
                 dropout=0.0):  # fmt: skip
        super().__init__()
        self.batch_first, self.cross, self.mask = batch_first, cross, mask
        self.need_weights, self.use_weights = need_weights, use_weights
        self.inp = nn.Linear(3, e)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=batch_first, bias=bias,
                                          kdim=kdim, vdim=kdim, add_bias_kv=add_bias_kv,
                                          dropout=dropout)  # fmt: skip
        self.kv = nn.Linear(3, kdim or e)
        self.head = nn.Linear(e, 2)

    def forward(self, x):  # x: (n, T, 3)
        h = torch.tanh(self.inp(x))
        kv = (
            torch.tanh(self.kv(x.flip(1)))
            if self.cross or self.attn.kdim != self.attn.embed_dim
            else h
        )
        value = kv * 0.5 + 0.1 if self.cross else kv
        t = x.shape[1]
        kw = {}
        if self.mask == "padding":  # a sample's last token is padding where its data says so
            pad = torch.zeros(x.shape[0], t, dtype=torch.bool)
            pad[:, -1] = x[:, -1, 0] > 0
            kw["key_padding_mask"] = pad
        elif self.mask == "float":
            kw["attn_mask"] = torch.linspace(-1, 1, t * t).reshape(t, t)
        elif self.mask == "bool":  # True: masked out; the diagonal stays visible
            kw["attn_mask"] = torch.rand(t, t, generator=torch.Generator().manual_seed(1)) > 0.6
            kw["attn_mask"].fill_diagonal_(False)
        elif self.mask == "padding+float":
            pad = torch.zeros(x.shape[0], t, dtype=torch.bool)
            pad[:, 0] = x[:, 0, 1] > 0
            kw["key_padding_mask"] = pad
            kw["attn_mask"] = torch.linspace(-1, 1, t * t).reshape(t, t)
        elif self.mask == "per-head":  # (N * heads, T, T): through the module's own forward
            c = torch.tanh(x[..., :1])  # a per-sample mask, a function of the sample alone
            m = (c @ c.transpose(1, 2)).detach()
            kw["attn_mask"] = (
                torch.cat([m, -m]).reshape(2, -1, t, t).transpose(0, 1).reshape(-1, t, t)
            )
        elif self.mask == "causal":
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(t)
            kw["is_causal"] = True
        q, k, v = (h, kv, value) if self.batch_first else (h.transpose(0, 1), kv.transpose(0, 1),
                                                          value.transpose(0, 1))  # fmt: skip
        a, w = self.attn(q, k, v, need_weights=self.need_weights, **kw)
        if not self.batch_first:
            a = a.transpose(0, 1)
        out = a.mean(1)
        if self.use_weights:
            out = out + (w * w).sum(-1).mean(-1, keepdim=True)  # softmax rows sum to 1: square
        return self.head(out)


def _case(seed=0, **kw):
    torch.manual_seed(seed)
    m = Block(**kw).double()
    m.eval()
    return m, torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64)


def _paths(m, x):
    return {p.name: p.path for p in fastntk.explain(m, x).params if p.name.startswith("attn.")}


CASES = {
    "self": {},
    "seq-first": dict(batch_first=False),
    "cross": dict(cross=True),
    "padding": dict(mask="padding"),
    "float-mask": dict(mask="float"),
    "causal": dict(mask="causal"),
    "bool-mask": dict(mask="bool"),
    "padding+float": dict(mask="padding+float"),
    "per-head-mask": dict(mask="per-head"),
    "no-bias": dict(bias=False),
    "cross-seq-first-padding": dict(cross=True, batch_first=False, mask="padding"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("output", ["sum", "trace", "full"])
def test_rule_matches_oracle(name, output):
    m, x1, x2 = _case(**CASES[name])
    paths = _paths(m, x1)
    assert set(paths.values()) <= {
        "rule:MultiheadAttentionRule",
        "rule:MultiheadAttentionRule (used inside 'attn''s call)",
    }
    assert len(paths) == (2 if CASES[name].get("bias", True) is False else 4)
    for other in (None, x2):
        ref = reduce(full_kernel(m, x1, other), output)
        theta = fastntk.ntk(m, x1, other, output=output, dtype=torch.float64)
        assert rel_err(theta, ref) <= TOL64


def test_rule_with_weight_selection_and_chunks():
    m, x1, x2 = _case(cross=True, mask="padding")
    sel = ["attn.in_proj_weight", "attn.out_proj.bias", "head.weight"]
    ref = reduce(full_kernel(m, x1, x2, params=sel), "trace")
    theta = fastntk.ntk(m, x1, x2, output="trace", params=sel, chunk_size=2, dtype=torch.float64)
    assert rel_err(theta, ref) <= TOL64


def test_rule_in_float32_and_on_layerwise():
    m, x1, _ = _case(mask="causal")
    ref = reduce(full_kernel(m, x1), "sum")
    m32 = m.float()
    for method in ("auto", "layerwise"):
        theta = fastntk.ntk(m32, x1.float(), method=method)
        assert theta.dtype == torch.float32
        assert rel_err(theta, ref) <= TOL[torch.float32]


@pytest.mark.parametrize(
    "kw,reason",
    [
        (dict(need_weights=True, use_weights=True), "declined"),
        (dict(need_weights=True, use_weights=True, batch_first=False), "declined"),
        (dict(need_weights=True), "rule"),
        (dict(kdim=6), "uncovered"),
        (dict(add_bias_kv=True), "uncovered"),
    ],
    ids=["weights-used", "weights-used-seq-first", "weights-returned-unused", "kdim", "bias-kv"],
)
def test_declined_and_uncovered_calls_take_the_fallback(kw, reason):
    """Attention weights that reach the output send the call to the fallback (the rule
    would miss their gradient); returned but unused weights leave the rule exact."""
    m, x1, x2 = _case(**kw)
    paths = _paths(m, x1)
    if reason == "rule":
        assert paths["attn.in_proj_weight"] == "rule:MultiheadAttentionRule"
    elif reason == "declined":
        assert (
            paths["attn.in_proj_weight"]
            == "fallback:module (MultiheadAttentionRule declined the call)"
        )
        assert paths["attn.out_proj.weight"] == "fallback:module (used inside 'attn''s call)"
    else:
        assert all(p.startswith("fallback:module") for p in paths.values()), paths
    for other in (None, x2):
        ref = reduce(full_kernel(m, x1, other), "sum")
        assert rel_err(fastntk.ntk(m, x1, other, dtype=torch.float64), ref) <= TOL64


def test_dropout_is_off_in_the_kernel():
    """A model left in train mode with attention dropout: ntk() runs it in eval mode (every
    module), so the rule serves it and the kernel is the deterministic one."""
    m, x1, _ = _case(dropout=0.5)
    m.train()
    assert _paths(m, x1)["attn.in_proj_weight"] == "rule:MultiheadAttentionRule"
    theta = fastntk.ntk(m, x1, dtype=torch.float64)
    assert m.training and m.attn.training  # restored
    m.eval()
    assert rel_err(theta, reduce(full_kernel(m, x1), "sum")) <= TOL64
    rule = fastntk.rules.attention.MultiheadAttentionRule()
    m.train()  # the rule itself declines a training-mode call with dropout
    assert not rule.accepts(m.attn, (), {}, (torch.zeros(1), None))
    m.eval()
    assert rule.accepts(m.attn, (), {}, (torch.zeros(1), None))


def test_model_unchanged_by_the_rule():
    m, x1, _ = _case(cross=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [
        (mod.training, [p.requires_grad for p in mod.parameters(recurse=False)])
        for mod in m.modules()
    ]
    fastntk.ntk(m, x1, output="full")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert flags == [(mod.training, [p.requires_grad for p in mod.parameters(recurse=False)])
                     for mod in m.modules()]  # fmt: skip
    assert all(p.grad is None for p in m.parameters())


def test_fallback_finds_each_outputs_batch_dim_when_tokens_equal_batch():
    """Sequence-first MHA returns (T, N, E) outputs and (N, T, S) weights: with T == N the
    shapes alone cannot tell the batch dimensions apart; the fallback finds them per output."""
    torch.manual_seed(3)
    m = Block(batch_first=False, need_weights=True, use_weights=True).double().eval()
    x = torch.randn(4, 4, 3, dtype=torch.float64)  # N = T = 4
    assert _paths(m, x)["attn.in_proj_weight"].startswith("fallback:module")
    for output in ("sum", "full"):
        ref = reduce(full_kernel(m, x), output)
        assert rel_err(fastntk.ntk(m, x, output=output, dtype=torch.float64), ref) <= TOL64
