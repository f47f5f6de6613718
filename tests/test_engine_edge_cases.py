"""Models outside the usual mould, each once silently wrong or crashing: held to the oracle.

Every case here was found by fuzzing the engine against the float64 oracle: layers fed
sequence-first tensors inside a batch-first model, modules called on tensors with no
batch dimension, user forward hooks that change an output, modules whose outputs feed
each other, blocks split into parameter-row ranges across chunks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from reference import TOL, full_kernel, reduce, rel_err

import fastntk
from fastntk.errors import UnsupportedError

TOL64 = TOL[torch.float64]
METHODS = ["auto", "layerwise"]


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check(m, x1, x2=None, output="sum", methods=METHODS):
    m = m.double()
    ref = reduce(full_kernel(m, x1, x2), output)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for method in methods:
        theta = fastntk.ntk(m, x1, x2, output=output, method=method, dtype=torch.float64)
        assert rel_err(theta, ref) <= TOL64, method
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("output", ["sum", "trace"])
def test_user_forward_hook_that_changes_the_output(output):
    """The rules see the module's own output: fastntk's hook runs before the user's."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    m[2].register_forward_hook(lambda mod, args, out: 3 * out)
    m[0].register_forward_hook(lambda mod, args, out: out + 1.0)
    _check(m, _x(4, 5), output=output)
    _check(m, _x(4, 5), _x(3, 5, seed=2), output=output)


@pytest.mark.parametrize("kw", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}])
@pytest.mark.parametrize("bag", [False, True])
def test_embeddings_without_per_sample_gradients_are_refused_untouched(kw, bag):
    """max_norm rewrites the looked-up rows in place during the forward; scale_grad_by_freq
    scales by batch-wide token counts: both refused before any forward."""
    torch.manual_seed(0)
    emb = nn.EmbeddingBag(10, 4, mode="sum", **kw) if bag else nn.Embedding(10, 4, **kw)
    with torch.no_grad():
        emb.weight.mul_(3)  # rows longer than max_norm
    m = nn.Sequential(emb, nn.Flatten(), nn.Linear(4 if bag else 12, 2))
    x = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    before = emb.weight.detach().clone()
    for call in (lambda: fastntk.ntk(m, x), lambda: fastntk.explain(m, x),
                 lambda: fastntk.ntk_sketch(m, x, sketch_dim=8)):  # fmt: skip
        with pytest.raises(
            UnsupportedError, match="max_norm" if kw.get("max_norm") else "scale_grad"
        ):
            call()
        assert torch.equal(emb.weight, before)


def test_embedding_bag_takes_index_inputs():
    torch.manual_seed(0)
    m = nn.Sequential(nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 2))
    x = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    _check(m, x)


def test_mixed_parameter_dtypes_ask_for_a_dtype():
    from fastntk.errors import InputTypeError

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2).double()

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).double())

    m = Mixed()
    with pytest.raises(InputTypeError, match="several dtypes"):
        fastntk.ntk(m, torch.randn(4, 3))


class _Recurrent(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.cell = issubclass(cls, nn.RNNCellBase)
        self.r = cls(4, 5) if self.cell else cls(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        if self.cell:  # unrolled over the sequence, zero state made by the cell
            h = None
            for t in range(x.shape[1]):
                h = self.r(x[:, t], h)
            return self.fc(h)
        return self.fc(self.r(x)[0][:, -1])


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM, nn.GRUCell])
def test_recurrent_layers_through_the_batch_graph(cls):
    torch.manual_seed(0)
    m = _Recurrent(cls)
    _check(m, _x(3, 3, 4), methods=["auto", "layerwise", "loop"])
    _check(m, _x(3, 3, 4), _x(2, 3, 4, seed=2), output="trace", methods=["auto"])
    with pytest.raises(UnsupportedError, match="method='auto'"):
        fastntk.ntk(m, _x(3, 3, 4), method="vmap")
    with pytest.raises(UnsupportedError, match="recurrent"):
        fastntk.ntk_sketch(m, _x(3, 3, 4), sketch_dim=8)
    assert "recurrent" in str(fastntk.explain(m, _x(3, 3, 4)))


class _Feeds(nn.Module):
    """No rule; returns (a, tanh(a)): the second output is computed from the first."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        a = x @ self.w.T
        return a, torch.tanh(a)


class _Split(nn.Module):
    """No rule; two outputs of one autograd node (no output feeds the other)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return (x @ self.w.T).chunk(2, dim=1)


class _TwoOut(nn.Module):
    def __init__(self, inner, width):
        super().__init__()
        self.inner = inner
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        a, b = self.inner(x)
        return self.fc(torch.cat([a * 0.5, torch.sin(b)], dim=1))


@pytest.mark.parametrize("inner,width", [(_Feeds, 8), (_Split, 4), (nn.LSTMCell, 10)])
@pytest.mark.parametrize("output", ["sum", "trace"])
def test_module_whose_outputs_feed_each_other(inner, width, output):
    """Each output's gradient is the rest of the model's alone (LSTMCell's c also reaches
    the loss through its h: counted twice before)."""
    torch.manual_seed(0)
    m = _TwoOut(nn.LSTMCell(3, 5) if inner is nn.LSTMCell else inner(), width)
    _check(m, _x(4, 3), output=output)
    _check(m, _x(4, 3), _x(3, 3, seed=2), output=output)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_called_under_no_grad(mode, method):
    """NAS scoring code often runs under no_grad: the kernel is still made of gradients
    (the backward passes were skipped: an all-zero kernel), and the mode is back after."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = _x(4, 5)
    ref = fastntk.ntk(m, x, method=method, dtype=torch.float64)
    assert rel_err(ref, reduce(full_kernel(m, x), "sum")) <= TOL64
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        xi = x.clone()  # an inference tensor under inference_mode
        theta = fastntk.ntk(m, xi, method=method, dtype=torch.float64)
        S = fastntk.ntk_sketch(m, xi, sketch_dim=16, seed=3)
        fastntk.explain(m, xi)
        assert not torch.is_grad_enabled()
    assert torch.equal(theta, ref)
    assert torch.equal(S, fastntk.ntk_sketch(m, x, sketch_dim=16, seed=3))


def test_output_rows_must_match_the_batch():
    from fastntk.errors import InputError

    m = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    with pytest.raises(InputError, match="2 rows for a batch of 5"):
        fastntk.ntk(m, x, output=lambda o: o[:2, 0])
    for method in ("auto", "vmap", "loop"):
        with pytest.raises(InputError, match="rows for a batch of"):
            fastntk.ntk(nn.Sequential(m, nn.Flatten(0)), x, method=method)


# -- layouts the probe measures (fastntk.engine.probe) -----------------------------------


class _SeqFirstEncoder(nn.Module):
    """PyTorch's default TransformerEncoderLayer (batch_first=False) inside a batch-first
    model: its Linear and LayerNorm calls see (T, N, E) tensors."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # (N, T, 8)
        return self.head(self.layer(x.transpose(0, 1)).transpose(0, 1).mean(1))


class _SeqFirstLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # (N, T, 8)
        return self.head(torch.tanh(self.fc(x.transpose(0, 1))).mean(0))


class _LearnedQuery(nn.Module):
    """A Linear on a learned query with no batch dim (DETR/Perceiver style)."""

    def __init__(self, t):
        super().__init__()
        self.query = nn.Parameter(torch.randn(t, 8) * 0.5)
        self.q_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # (N, S, 8)
        q = self.q_proj(self.query)
        att = torch.softmax(torch.einsum("td,nsd->nts", q, x), -1)
        return self.head(torch.einsum("nts,nsd->nd", att, x))


class _SharedTable(nn.Module):
    """A rule-less layer given a shared (T, E) table besides its batched input."""

    class AddPos(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.tensor(0.7))

        def forward(self, x, pe):
            return x + self.alpha * pe

    def __init__(self, t):
        super().__init__()
        self.pos = self.AddPos()
        self.fc = nn.Linear(8, 2)
        self.register_buffer("pe", torch.randn(t, 8))

    def forward(self, x):  # (N, T, 8)
        return self.fc(torch.tanh(self.pos(x, self.pe)).mean(1))


class _SeqFirstBroadcast(nn.Module):
    """A parameter added to a sequence-first activation outside any module."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(1, 1, 8) * 0.3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):  # (N, T, 8)
        return self.fc(torch.tanh(x.transpose(0, 1) + self.p).mean(0))


LAYOUTS = {
    "seq-first encoder": lambda t: _SeqFirstEncoder(),
    "seq-first linear": lambda t: _SeqFirstLinear(),
    "learned query": _LearnedQuery,
    "shared table": _SharedTable,
    "seq-first broadcast": lambda t: _SeqFirstBroadcast(),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("n", [3, 4, 1])
def test_sample_dims_are_measured(name, n):
    """T = N made each of these silently wrong (a sequence or a table taken for the
    samples), T != N crashed or was wrong as well."""
    torch.manual_seed(0)
    m = LAYOUTS[name](3)
    _check(m, _x(n, 3, 8))
    _check(m, _x(n, 3, 8), _x(2, 3, 8, seed=2), output="trace")
    _check(m, _x(300, 3, 8), methods=["auto"])  # panels: chunks of 256 and 44


def test_learned_query_goes_to_a_fallback_over_the_batch():
    torch.manual_seed(0)
    m = _LearnedQuery(3).double()
    paths = {p.name: p.path for p in fastntk.explain(m, _x(3, 5, 8)).params}
    # the model's own call (it owns `query`) re-runs per sample, q_proj's call inside it
    assert paths["q_proj.weight"] == "fallback:module (used inside the model's call)"
    assert paths["head.weight"] == "rule:LinearRule"

    class Frozen(_LearnedQuery):  # no parameter of the model itself: no call to adopt into
        def __init__(self):
            super().__init__(3)
            self.query.requires_grad_(False)

    paths = {p.name: p.path for p in fastntk.explain(Frozen().double(), _x(3, 5, 8)).params}
    assert paths["q_proj.weight"].startswith("fallback:model (its module's call has no sample dim")
    _check(Frozen(), _x(3, 5, 8), methods=["auto"])
    _check(m, _x(3, 5, 8), methods=["auto"])
    # q_proj alone selected: its block only reaches the kernel through the rest
    ref = full_kernel(m, _x(3, 5, 8), params=["q_proj.weight", "q_proj.bias"])
    theta = fastntk.ntk(
        m, _x(3, 5, 8), params=["q_proj.weight", "q_proj.bias"], dtype=torch.float64
    )
    assert rel_err(theta, reduce(ref, "sum")) <= TOL64


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("n", [6, 5])
def test_weight_norm_parametrization(conv, n):
    """The parametrization's call has no inputs and returns the weight (6 rows: N = 6
    took those rows for samples)."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    if conv:
        m = nn.Sequential(nn.Conv2d(2, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 16, 3))
        x = _x(n, 2, 6, 6)
    else:
        m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x = _x(n, 4)
    m[0] = parametrizations.weight_norm(m[0])
    _check(m, x)


def test_mha_sequence_first_with_used_weights_and_padding_mask():
    """The per-module fallback of a sequence-first MHA: its (N, S) key-padding mask has
    the samples in dim 0 while query/key/value have them in dim 1."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.head = nn.Linear(8, 2)

        def forward(self, x):  # (N, T, 8)
            pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            pad[::2, -1] = True
            q = x.transpose(0, 1)
            a, w = self.attn(q, q, q, key_padding_mask=pad, need_weights=True)
            return self.head(a.mean(0)) + (w * w).sum((1, 2)).unsqueeze(1)

    torch.manual_seed(0)
    for n in (4, 3):
        _check(M(), _x(n, 4, 8))


class _Centred(nn.Module):
    """Samples coupled inside the forward: each is centred on the batch mean."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h - h.mean(0, keepdim=True))


def test_samples_coupled_inside_the_model_take_the_batch_graph():
    from fastntk.errors import OptionError

    torch.manual_seed(0)
    m = _Centred()
    _check(m, _x(5, 4))
    x1, x2 = _x(5, 4), _x(3, 4, seed=2)  # a cross-kernel: one batch, as for bn="batch"
    ref = reduce(full_kernel(m.double(), torch.cat([x1, x2])), "trace")[:5, 5:]
    theta = fastntk.ntk(m, x1, x2, output="trace", dtype=torch.float64)
    assert rel_err(theta, ref) <= TOL64
    with pytest.raises(OptionError, match="coupled inside the model"):
        fastntk.ntk_sketch(m, _x(5, 4), sketch_dim=8)
    assert "coupled inside the model" in str(fastntk.explain(m, _x(5, 4)))


def test_probe_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(1, 4)
    state = torch.get_rng_state()
    fastntk.ntk(m, x)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_user_backward_hooks_are_suspended_and_kept(method):
    """The kernel is of the function: a user's backward hook (here one that doubles the
    gradient) neither runs nor changes it, and stays registered (torch.func refused the
    model before)."""

    class Scale(nn.Module):  # no rule: the per-module fallback
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4))

        def forward(self, x):
            return x * self.w

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Scale(), nn.Linear(4, 2)).double()
    x = _x(5, 3)
    ref = fastntk.ntk(m, x, method="loop", dtype=torch.float64)
    calls = []
    m[2].register_full_backward_hook(lambda mod, gi, go: calls.append(1) or (gi[0] * 2,))
    m[3].register_full_backward_pre_hook(lambda mod, go: calls.append(1))
    theta = fastntk.ntk(m, x, method=method, dtype=torch.float64)
    assert rel_err(theta, ref) <= TOL64 and not calls
    m(x).sum().backward()
    assert len(calls) == 2  # still registered


# -- the probe's second round of fuzzing -----------------------------------------------


class _Trimmed(nn.Module):
    """A token batch trimmed to its longest sequence (padding masked): the token dim is
    the batch's longest in a chunk, the probed sample's own length in the probe."""

    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(11, 6, padding_idx=0)
        self.l = nn.Linear(6, 6)
        self.o = nn.Linear(6, 3)

    def forward(self, idx):
        length = int((idx != 0).sum(1).max())
        idx = idx[:, :length]
        mask = (idx != 0).unsqueeze(-1).to(self.o.weight.dtype)
        h = torch.tanh(self.l(self.e(idx)))
        return self.o((h * mask).sum(1) / mask.sum(1))


def test_sizes_that_depend_on_the_data_keep_the_rules():
    torch.manual_seed(0)
    idx = torch.randint(1, 11, (5, 6), generator=torch.Generator().manual_seed(1))
    for i, length in enumerate([2, 4, 3, 5, 2]):
        idx[i, length:] = 0
    m = _Trimmed()
    _check(m, idx)
    assert all(p.path.startswith("rule:") for p in fastntk.explain(m.double(), idx).params)


@pytest.mark.parametrize("chunk", [None, 1])
def test_one_dim_token_inputs_with_single_sample_chunks(chunk):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    idx = torch.tensor([3, 7, 1, 3, 9])
    _check(m, idx[:1])
    _check(m, idx)
    theta = fastntk.ntk(m.double(), idx, chunk_size=chunk, dtype=torch.float64)
    assert rel_err(theta, reduce(full_kernel(m, idx), "sum")) <= TOL64


class _Cumsum(nn.Module):
    """Coupled without changing the first sample: y_i = f(h_0 + ... + h_i)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).cumsum(0))


class _NeedsBatch(nn.Module):
    """Coupled, and refuses a batch of one (the probe retries with two samples)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        if x.shape[0] < 2:
            raise ValueError("needs a batch of two or more")
        h = torch.tanh(self.a(x))
        return self.b(h * h.std(0))


@pytest.mark.parametrize("cls", [_Cumsum, _NeedsBatch])
def test_couplings_the_first_sample_does_not_show(cls):
    torch.manual_seed(0)
    _check(cls(), _x(6, 4))


def test_a_module_returning_one_tensor_twice():
    """No rule, outputs (a, a): the gradient at a's node already holds both uses."""

    class Dup(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            a = x @ self.w.T
            return a, a

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.d, self.fc = Dup(), nn.Linear(4, 2)

        def forward(self, x):
            a, b = self.d(x)
            return self.fc(torch.tanh(a) + b * b)

    torch.manual_seed(0)
    _check(M(), _x(4, 3))


@pytest.mark.parametrize("layer", [nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4)])
def test_rule_modules_called_with_a_keyword_input(layer):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.fc = layer, nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.tanh(self.layer(input=x)))

    torch.manual_seed(0)
    _check(M(), _x(5, 4))


def test_forward_that_branches_on_the_batch_size_is_refused_across_chunks():
    import torch.nn.functional as F

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x) if x.shape[0] > 1 else F.linear(x, self.a.weight, self.a.bias)
            return self.b(torch.tanh(h))

    torch.manual_seed(0)
    m = M().double()
    _check(m, _x(5, 4))  # one chunk: exact
    with pytest.raises(UnsupportedError, match="depends on the batch"):
        fastntk.ntk(m, _x(5, 4), chunk_size=2, dtype=torch.float64)
    with pytest.raises(UnsupportedError, match="depends on the batch"):
        fastntk.ntk(m, _x(4, 4), _x(5, 4, seed=2), chunk_size=4, dtype=torch.float64)


class _Frames(nn.Module):
    """Time-distributed: (N, T, C) frames merged into one BatchNorm's rows (N*T, C)."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(3), nn.Linear(3, 2)

    def forward(self, x):
        n, t, c = x.shape
        return self.fc(self.bn(x.reshape(n * t, c)).reshape(n, t, c).relu().mean(1))


class _TimeRows(nn.Module):
    """A BatchNorm1d on (T, C, N): rows are time steps, the samples its positions."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.bn(x.permute(1, 2, 0)).permute(2, 0, 1).tanh().mean(1))


class _Query(nn.Module):
    """A BatchNorm on a learned query (no sample dim), as many rows as the samples."""

    def __init__(self, rows):
        super().__init__()
        self.q = nn.Parameter(torch.randn(rows, 3))
        self.bn, self.fc = nn.BatchNorm1d(3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc((x @ self.bn(self.q).T).tanh() @ self.q)


@pytest.mark.parametrize(
    "make,shape",
    [
        (_Frames, (4, 5, 3)),
        (_TimeRows, (4, 5, 3)),
        (_TimeRows, (4, 4, 3)),
        (lambda: _Query(4), (4, 3)),
    ],
    ids=["merged-frames", "time-rows", "time-rows-T=N", "query-rows=N"],
)
def test_per_sample_batchnorm_whose_rows_are_not_the_samples(make, shape):
    """bn="per_sample" is each sample alone through a train-mode BatchNorm (the oracle).
    Where a BatchNorm's rows are not the samples, a batched forward cannot normalise per
    sample (it normalised each row, silently, and method="vmap" did the same inside
    vmap): "auto", "loop" and "vmap" run each sample alone, the layerwise methods refuse."""
    torch.manual_seed(0)
    m = make().double()
    x1, x2 = _x(*shape), _x(3, *shape[1:], seed=2)
    for xa, xb in ((x1, None), (x1, x2)):
        ref = reduce(full_kernel(m, xa, xb, bn="per_sample"), "sum")
        for method in ("auto", "vmap", "loop"):
            theta = fastntk.ntk(m, xa, xb, bn="per_sample", method=method, dtype=torch.float64)
            assert rel_err(theta, ref) <= TOL64, method
    with pytest.raises(UnsupportedError, match="per_sample.*method='auto', 'loop' or 'vmap'"):
        fastntk.ntk(m, x1, bn="per_sample", method="layerwise", dtype=torch.float64)
    with pytest.raises(UnsupportedError, match="per_sample"):
        fastntk.ntk_sketch(m, x1, bn="per_sample", sketch_dim=8, dtype=torch.float64)
    report = fastntk.explain(m, x1, bn="per_sample")
    assert {p.path for p in report.params} == {"vmap"} and "each sample alone" in str(report)
    _check(make(), x1)  # eval: exact on every method


def test_per_sample_batchnorm_on_one_sample_rows_keeps_the_fast_path():
    """Rows that are the samples (the usual (N, C, H, W)): no vmap, same kernel."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    m.append(nn.Linear(12, 2))
    m = m.double()
    x = _x(5, 2, 4, 4)
    ref = reduce(full_kernel(m, x, bn="per_sample"), "sum")
    with fastntk.profile() as prof:
        theta = fastntk.ntk(m, x, bn="per_sample", dtype=torch.float64)
    assert rel_err(theta, ref) <= TOL64
    assert prof.seconds.get("per_sample", 0) > 0 and prof.seconds.get("jacobian", 0) == 0
    loop = fastntk.ntk(m, x, bn="per_sample", method="loop", dtype=torch.float64)
    assert rel_err(loop, ref) <= TOL64
    assert {p.path for p in fastntk.explain(m, x, bn="per_sample").params} == {
        "rule:ConvRule",
        "rule:BatchNormRule",
        "rule:LinearRule",
    }


def test_a_forward_that_depends_on_the_batch_position_stays_exact():
    """Every other sample scaled by 2 (position, not data): the last sample alone differs
    from the last sample in the batch, so the probe takes the batch graph (exact)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            scale = torch.ones(x.shape[0], 1, dtype=x.dtype)
            scale[1::2] = 2.0
            return self.b(torch.tanh(self.a(x)) * scale)

    torch.manual_seed(0)
    _check(M(), _x(4, 4))
    assert "coupled" in str(fastntk.explain(M().double(), _x(4, 4)))


class _Squeezed(nn.Module):
    """A sequence-first Linear, and a `.squeeze()` that refuses one sample (the probe
    retries with more)."""

    def __init__(self, coupled=False):
        super().__init__()
        self.coupled = coupled
        self.seq, self.head = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x):  # (N, T, 4)
        h = torch.tanh(self.seq(x.transpose(0, 1))).mean(0)
        if self.coupled:
            h = h - h.mean(0)
        out = self.head(h).squeeze()
        if out.dim() != 1:
            raise ValueError("needs a batch of two or more")
        return out


@pytest.mark.parametrize("n,t,chunk", [(2, 2, None), (6, 2, 2), (2, 5, None)])
def test_probe_retries_models_that_refuse_one_sample(n, t, chunk):
    torch.manual_seed(0)
    m = _Squeezed().double()
    theta = fastntk.ntk(m, _x(n, t, 4), chunk_size=chunk, dtype=torch.float64)
    assert rel_err(theta, reduce(full_kernel(m, _x(n, t, 4)), "sum")) <= TOL64
    _check(_Squeezed(coupled=True), _x(2, 2, 4))


def test_broadcast_parameter_keeps_its_rule_in_a_last_small_chunk(monkeypatch):
    from fastntk.engine import fallback

    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 3, 4) * 0.3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.tanh(x + self.pos).mean(1))

    fallbacks = []
    real = fallback.module_grads
    monkeypatch.setattr(fallback, "module_grads",
                        lambda call, rec, g: fallbacks.append(rec.mname) or real(call, rec, g))  # fmt: skip
    torch.manual_seed(0)
    m = Pos().double()
    for chunk in (None, 2, 3):
        theta = fastntk.ntk(m, _x(3, 3, 4), chunk_size=chunk, dtype=torch.float64)
        assert rel_err(theta, reduce(full_kernel(m, _x(3, 3, 4)), "sum")) <= TOL64
    assert not fallbacks


@pytest.mark.parametrize("method", ["layerwise", "loop"])
def test_one_sample_batchnorm_backward_with_channels_last_gradients(method):
    """PyTorch's CPU BatchNorm backward is wrong for one sample whose output gradient
    comes in channels-last strides (flatten(2).transpose(1, 2) downstream)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = (
                nn.Conv2d(3, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.Linear(4, 2),
            )

        def forward(self, x):
            return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(2).transpose(1, 2)).mean(1)

    torch.manual_seed(0)
    m = M().double()
    with torch.no_grad():
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.weight.uniform_(0.5, 1.5)
    x = _x(3, 3, 3, 3)
    for n in (1, 3):
        ref = reduce(full_kernel(m, x[:n], params=["conv.bias"]), "sum")
        theta = fastntk.ntk(m, x[:n], params=["conv.bias"], method=method, dtype=torch.float64)
        assert rel_err(theta, ref) <= TOL64
    _check(m, x[:1], methods=["auto", "loop"])


def test_per_sample_batchnorm_on_part_of_the_batch():
    """A BatchNorm on each half of the batch: its rows are samples, but fewer than the
    batch's; "loop" refused it for a while (the row count), now it and "auto" are exact."""

    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.out = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc(x)
            h = torch.stack([h, h**2], 2)  # (N, 4, 2)
            h = torch.cat([self.bn(p) for p in h.chunk(2)])
            return self.out(torch.tanh(h).sum(2))

    torch.manual_seed(0)
    m = Halves().double()
    x = _x(6, 3)
    ref = reduce(full_kernel(m, x, bn="per_sample"), "sum")
    for method in ("auto", "loop", "vmap"):
        theta = fastntk.ntk(m, x, bn="per_sample", method=method, dtype=torch.float64)
        assert rel_err(theta, ref) <= TOL64, method


class _Coupled(nn.Module):
    """Samples coupled in ways the probe's last sample alone did not show."""

    def __init__(self, kind):
        super().__init__()
        self.a, self.b, self.kind = nn.Linear(3, 4), nn.Linear(4, 2), kind

    def forward(self, x):
        h = self.a(x)
        if self.kind == "std":  # one sample alone: std NaN (the probe read NaN as "equal")
            h = (h - h.mean(0)) / h.std(0)
        elif self.kind == "reverse_cumsum":  # leaves the last sample's output unchanged
            h = h.flip(0).cumsum(0).flip(0)
        elif self.kind == "minus_last":  # a reference taken from the last sample
            h = h - 0.5 * h[-1:]
        elif self.kind.startswith("groups_of_"):  # cannot run on one sample (or two)
            g = h.view(-1, int(self.kind[-1]), 4)
            h = (g + g.mean(1, keepdim=True)).view(-1, 4)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize(
    "kind", ["std", "reverse_cumsum", "minus_last", "groups_of_2", "groups_of_3"]
)
def test_couplings_the_last_sample_alone_does_not_show(kind):
    """Each was a silent wrong kernel (the oracle check below failed). The probe now also
    runs the chunk's first sample alone (with two-sample probes: the first and the last
    together, which pairs do not group), takes a sample's non-finite output alone (finite
    in the batch) as coupling, and a model that cannot run on one or two samples through
    the batch graph (independence unchecked)."""
    torch.manual_seed(0)
    m = _Coupled(kind).double()
    x = _x(6, 3)
    ref = reduce(full_kernel(m, x), "sum")
    for method in ("auto", "layerwise"):
        theta = fastntk.ntk(m, x, method=method, dtype=torch.float64)
        assert rel_err(theta, ref) <= TOL64, method


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("output", ["sum", "trace"])
def test_prelu_under_vmap(n, output):
    """torch.func's vmap(jacrev) over F.prelu is wrong in torch 2.13 (silently at N = K = 2
    for "trace", a size error otherwise): PReLU runs as torch.where during a call."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2), nn.PReLU()).double()
    x = _x(n, 3)
    ref = reduce(full_kernel(m, x), output)
    for method in ("vmap", "auto", "layerwise"):
        theta = fastntk.ntk(m, x, output=output, method=method, dtype=torch.float64)
        assert rel_err(theta, ref) <= TOL64, method
    assert "forward" not in m[1].__dict__  # restored


class _CausalHintWithMask(nn.Module):
    """``is_causal=True`` with a mask that is not causal: PyTorch's attention forward drops
    the mask for the hint only with ``need_weights=False``; the rule dropped it always."""

    def __init__(self, need_weights):
        super().__init__()
        self.need_weights = need_weights
        self.mha, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        am = torch.zeros(4, 4, dtype=torch.bool)
        am[0, 1] = am[2, 0] = True
        o, _ = self.mha(x, x, x, attn_mask=am, is_causal=True, need_weights=self.need_weights)
        return self.head(o).mean(1)


class _Float32Masks(nn.Module):
    """Float masks in float32 with a float64 computation: PyTorch adds them in their own
    dtype, then casts; the rule cast each first (errors of 1e-9)."""

    def __init__(self):
        super().__init__()
        self.mha, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        t = x.shape[1]
        am = torch.linspace(-1, 1, t * t).view(t, t) * 1.37
        kpm = (x[..., 0] > 0.5).float() * -3.1
        o, _ = self.mha(x, x, x, attn_mask=am, key_padding_mask=kpm, need_weights=False)
        return self.head(o).mean(1)


@pytest.mark.parametrize("model", ["hint, weights", "hint, no weights", "float32 masks"])
def test_attention_masks_as_pytorch_reads_them(model):
    torch.manual_seed(0)
    m = {"hint, weights": lambda: _CausalHintWithMask(True),
         "hint, no weights": lambda: _CausalHintWithMask(False),
         "float32 masks": _Float32Masks}[model]()  # fmt: skip
    x = _x(5, 4, 8) if model != "float32 masks" else _x(6, 5, 8)
    _check(m, x, output="trace")


class _SparseTable(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.e, self.bn, self.h = (
            nn.Embedding(6, 3, sparse=True),
            nn.BatchNorm1d(3),
            nn.Linear(3, 2),
        )

    def forward(self, t):
        u = torch.tanh(self.e(t)).sum(1)
        if self.how == "tied":  # the table used outside its module's call: whole-model fallback
            return nn.functional.linear(u, self.e.weight)
        return self.h(self.bn(u) if self.how == "bn" else u)


@pytest.mark.parametrize("how, method, bn", [
    ("plain", "loop", "eval"), ("plain", "vmap", "eval"), ("plain", "auto", "eval"),
    ("bn", "auto", "batch"), ("tied", "auto", "eval"),
])  # fmt: skip
def test_sparse_embedding_on_every_path(how, method, bn):
    """``nn.Embedding(sparse=True)``: sparse gradients crashed the loop, vmap, the batch
    graph and the whole-model fallback with raw torch errors. The table is dense during
    the call (the same values) and sparse again afterwards."""
    torch.manual_seed(0)
    m = _SparseTable(how).double()
    x = torch.randint(0, 6, (4, 3), generator=torch.Generator().manual_seed(2))
    dense = copy.deepcopy(m)
    dense.e.sparse = False  # (the oracle's jacrev cannot take sparse gradients either)
    ref = reduce(full_kernel(dense, x, bn=bn), "sum")
    theta = fastntk.ntk(m, x, method=method, bn=bn, dtype=torch.float64)
    assert rel_err(theta, ref) <= TOL64
    assert m.e.sparse


def _identity(self, x):
    return x


@pytest.mark.parametrize("bn", ["eval", "batch", "per_sample"])
def test_forward_set_on_an_instance(bn):
    """NASLib / zero-cost-nas copy a network with ``bn=False`` by setting each
    BatchNorm's forward to an identity on the instance: the BatchNorm rule still applied
    (gamma and beta got gradients the function does not have), and ``bn="per_sample"``
    replaced the user's forward with fastntk's. Now the forward runs as set (eval,
    batch); per_sample, which would have to replace it, refuses."""
    import types

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                      nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()  # fmt: skip
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    m[1].forward = types.MethodType(_identity, m[1])
    x = _x(5, 2, 5, 5)
    ref = reduce(full_kernel(m, x), "sum")  # (the identity: no batch statistics in any mode)
    for method in ("auto", "layerwise", "vmap", "loop"):
        if bn == "per_sample":
            with pytest.raises(UnsupportedError, match="forward is set on the instance"):
                fastntk.ntk(m, x, bn=bn, method=method, dtype=torch.float64)
            continue
        theta = fastntk.ntk(m, x, bn=bn, method=method, dtype=torch.float64)
        assert rel_err(theta, ref) <= TOL64, method
    assert m[1].forward.__func__ is _identity and m.training  # (as it came)


class _ScaledConv1d(nn.Conv1d):
    """A weight transformed in ``_conv_forward`` (fake quantisation, weight scaling):
    ``forward`` is inherited, the computation is not Conv1d's."""

    def _conv_forward(self, x, w, b):
        return super()._conv_forward(x, 2.0 * w.tanh(), b)


class _ScaledConv2d(nn.Conv2d):
    def _conv_forward(self, x, w, b):
        return super()._conv_forward(x, 2.0 * w.tanh(), b)


class _InitConv2d(nn.Conv2d):
    """Only the initialisation is its own: Conv2d's computation, so Conv2d's rule."""

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.3)
        nn.init.zeros_(self.bias)


@pytest.mark.parametrize("make, shape", [
    (lambda: _ScaledConv1d(2, 3, 3), (4, 2, 6)),
    (lambda: _ScaledConv2d(2, 3, 3), (4, 2, 5, 5)),
    (lambda: _ScaledConv2d(2, 3, 3, padding=1), (3, 2, 12, 12)),  # the >= 64-position strategy
    (lambda: _InitConv2d(2, 3, 3), (4, 2, 5, 5)),
], ids=["conv1d", "conv2d-patches", "conv2d-grouped-grad", "own-init"])  # fmt: skip
def test_conv_subclass_that_overrides_conv_forward(make, shape):
    """``_conv_forward`` overridden, ``forward`` inherited: the Conv rule (the gradient of
    the untransformed weight) gave wrong kernels; such a subclass is another
    computation and takes the exact fallback. A subclass with its own initialisation only
    keeps the rule."""
    torch.manual_seed(0)
    conv = make()
    m = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = _x(*shape)
    m(x)  # the lazy layer takes its size
    _check(m, x, output="trace")
    _check(m, x, _x(2, *shape[1:], seed=3), output="sum")
    path = {p.name: p.path for p in fastntk.explain(m, x).params}["0.weight"]
    assert (path == "rule:ConvRule") == isinstance(conv, _InitConv2d), path


def test_conv_forward_set_on_the_instance_is_not_the_rules():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    conv._conv_forward = lambda x, w, b: nn.functional.conv2d(x, w.abs(), b)
    m = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(27, 2))
    _check(m, _x(4, 2, 5, 5))
    assert {p.name: p.path for p in fastntk.explain(m, _x(4, 2, 5, 5)).params}[
        "0.weight"
    ] != "rule:ConvRule"


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 1)], ids=["(N, C)", "(N, C, 1)"])
@pytest.mark.parametrize("method", ["auto", "layerwise", "vmap", "loop", "sketch"])
def test_per_sample_batchnorm_of_one_value_per_channel_is_refused(shape, method):
    """bn="per_sample" on (N, C) features: each sample's one value per channel, normalised
    by its own statistics, is 0 whatever the input. The layerwise methods gave an all-zero
    kernel (the constant output cut the graph, and every parameter's blocks with it), vmap
    and loop another; PyTorch refuses a train-mode BatchNorm on one such sample, and so
    does fastntk, on every method, leaving the model as it was."""
    torch.manual_seed(0)
    first = nn.Linear(4, 5) if len(shape) == 2 else nn.Conv1d(4, 5, 1)
    m = nn.Sequential(first, nn.BatchNorm1d(5), nn.Tanh(), nn.Flatten(), nn.Linear(5, 2)).double()
    before = copy.deepcopy(m.state_dict())
    x = _x(*shape)
    with pytest.raises(UnsupportedError, match="one value per channel per sample.*bn='eval'"):
        fastntk.ntk(m, x, bn="per_sample", method=method, dtype=torch.float64)
    with pytest.raises(UnsupportedError, match="one value per channel per sample"):
        fastntk.ntk(m, x, x[:2], bn="per_sample", method=method, dtype=torch.float64)
    with pytest.raises(UnsupportedError, match="one value per channel per sample"):
        fastntk.explain(m, x, bn="per_sample")
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert m.training
    for bn in ("eval", "batch"):  # the other modes are defined (and held to the oracle)
        theta = fastntk.ntk(m, x, bn=bn, method=method if method != "sketch" else "auto",
                            dtype=torch.float64)  # fmt: skip
        assert rel_err(theta, reduce(full_kernel(m, x, bn=bn), "sum")) <= TOL64, bn


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dims", [1, 2])
def test_batchnorm_without_running_statistics(dims, affine):
    """``track_running_stats=False``: batch statistics in eval mode too, so the samples
    are coupled under bn="eval" (the batch graph), and a cross-kernel takes x1 and x2 as
    one batch, as bn="batch" does (the oracle had normalised them apart)."""
    torch.manual_seed(0)
    if dims == 1:
        body = [nn.Linear(3, 4), nn.BatchNorm1d(4, affine=affine, track_running_stats=False)]
        shape = (3,)
    else:
        body = [nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, affine=affine, track_running_stats=False),
                nn.Flatten()]  # fmt: skip
        shape = (2, 4, 4)
    m = nn.Sequential(*body, nn.Tanh(), nn.LazyLinear(2)).double()
    x1, x2 = _x(5, *shape), _x(3, *shape, seed=2)
    m(x1)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        _check(m, x1, methods=["auto", "layerwise", "vmap", "loop"])
        _check(m, x1, x2, methods=["auto", "layerwise", "vmap", "loop"])
        _check(m, x1, x2, output="trace", methods=["auto"])
        assert m.training == (mode == "train")
    joint = fastntk.ntk(m, torch.cat([x1, x2]), dtype=torch.float64)
    assert torch.allclose(
        fastntk.ntk(m, x1, x2, dtype=torch.float64), joint[:5, 5:], rtol=1e-12, atol=0
    )


class _RunningMean(nn.Module):
    """A user layer (no rule; ``x / f(w)``: no node rule either) that updates a buffer in its
    forward, as a running average."""

    def __init__(self, mutate=True):
        super().__init__()
        self.mutate = mutate
        self.w = nn.Parameter(torch.randn(3))
        self.register_buffer("avg", torch.zeros(3))

    def forward(self, x):
        if self.mutate:
            with torch.no_grad():
                self.avg.mul_(0.9).add_(0.1 * x.mean(0))
        return torch.tanh(x / (2 + self.w.sin()))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_forward_that_updates_a_buffer_in_place(chunk_size):
    """torch.func cannot transform an in-place update of a buffer it does not own: "auto"
    crashed with torch.func's RuntimeError (the layer's per-module fallback); the
    layerwise methods now take the batch graph, "vmap" and the sketch raise a typed error
    saying so. The oracle cannot run it either: it is held to the same model without
    the update (the buffer does not reach the output)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), _RunningMean(), nn.Linear(3, 2)).double()
    x1, x2 = _x(5, 3), _x(3, 3, seed=2)
    m[1].mutate = False
    refs = [reduce(full_kernel(m, x1, x2), "sum"), reduce(full_kernel(m, x1), "trace")]
    m[1].mutate = True
    for method in ("auto", "layerwise", "loop"):
        got = [fastntk.ntk(m, x1, x2, method=method, chunk_size=chunk_size, dtype=torch.float64),
               fastntk.ntk(m, x1, output="trace", method=method, chunk_size=chunk_size,
                           dtype=torch.float64)]  # fmt: skip
        assert all(rel_err(g, r) <= TOL64 for g, r in zip(got, refs, strict=True)), method
    from fastntk.engine import CapturedMutationError

    with pytest.raises(CapturedMutationError, match="buffer updated in forward.*'auto' or 'loop'"):
        fastntk.ntk(m, x1, method="vmap", dtype=torch.float64)
    ex = fastntk.explain(m, x1)
    assert ex.strategy == "coupled" and "buffer in place" in ex.why, ex.why
    assert any("changes a tensor in place" in n for n in ex.notes), ex.notes
    assert torch.equal(m[1].avg, torch.zeros(3, dtype=torch.float64))  # (explain's trial run)
    with pytest.raises(UnsupportedError, match=r"'1' \(_RunningMean"):
        fastntk.ntk_sketch(m, x1, sketch_dim=8, dtype=torch.float64)
    assert torch.equal(m[1].avg, torch.zeros(3, dtype=torch.float64))  # the user's buffer


class _Gated(nn.Module):
    """A user layer (no rule; ``x / f(w)``: no node rule) whose forward branches on a value
    (``.item()``, as Hugging Face's padding check does), or calls an op whose output shape
    depends on the values."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        if self.how == "item" and (x * self.w).sum().item() > 1e9:  # never true
            return x
        if self.how == "nonzero":
            x = x + 0 * torch.nonzero(x.abs() > -1).sum()  # the size depends on the values
        return torch.tanh(x / (2 + self.w.sin()))


@pytest.mark.parametrize("how", ["item", "nonzero"])
@pytest.mark.parametrize("where", ["module", "model"])
def test_forward_torch_func_cannot_trace(how, where):
    """A forward torch.func's vmap cannot transform (data-dependent control flow, .item(),
    an output of data-dependent shape) in a per-module fallback or in the whole-model one
    (a parameter used outside its module): "auto" and "layerwise" take the batch graph,
    exact; "vmap" and the sketch raise UntraceableError naming the methods that can."""
    torch.manual_seed(0)
    gated = _Gated(how)
    if where == "module":
        m = nn.Sequential(nn.Linear(3, 3), gated, nn.Linear(3, 2)).double()
    else:  # the gated layer's call inside a parent's forward that also uses its parameter
        m = _OutsideGated(gated).double()
    x1, x2 = _x(5, 3), _x(3, 3, seed=2)
    refs = [reduce(full_kernel(m, x1, x2), "sum"), reduce(full_kernel(m, x1), "full")]
    for method in ("auto", "layerwise", "loop"):
        got = [fastntk.ntk(m, x1, x2, method=method, dtype=torch.float64),
               fastntk.ntk(m, x1, output="full", method=method, dtype=torch.float64)]  # fmt: skip
        assert all(rel_err(g, r) <= TOL64 for g, r in zip(got, refs, strict=True)), method
    from fastntk.errors import UntraceableError

    with pytest.raises(UntraceableError, match="torch.func cannot .*'auto' or 'loop'"):
        fastntk.ntk(m, x1, method="vmap", dtype=torch.float64)
    with pytest.raises(UntraceableError, match="'auto' or 'loop'"):
        fastntk.ntk_sketch(m, x1, sketch_dim=8, dtype=torch.float64)
    ex = fastntk.explain(m, x1)  # says so, and shows the plan auto runs
    assert ex.strategy == "coupled" and "cannot trace" in ex.why, ex.why
    assert any("torch.func cannot differentiate" in n and "batch graph" in n for n in ex.notes)
    assert {p.path for p in ex.params} == {"coupled"}


class _OutsideGated(nn.Module):
    def __init__(self, gated):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.gated = gated
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = self.gated(self.lin(x)) + self.gated.w  # its parameter outside its call too
        return self.out(h)


class _DoubledBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_batchnorm_subclass_with_its_own_forward():
    """bn="per_sample" replaced every BatchNorm's forward by per-sample statistics, also
    a subclass's own forward (its extra computation was dropped: wrong kernels on every
    method, helper-24); it is refused now, as a forward set on the instance is. Under
    "eval" and "batch" the subclass's forward runs as written (exact)."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), _DoubledBN(3), nn.Flatten(), nn.Linear(48, 2)
    ).double()
    x = _x(3, 3, 4, 4)
    for method in ("auto", "layerwise", "vmap", "loop", "sketch"):
        with pytest.raises(UnsupportedError, match="its class overrides BatchNorm's forward"):
            fastntk.ntk(m, x, bn="per_sample", method=method, dtype=torch.float64)
    for bn in ("eval", "batch"):
        for method in ("auto", "vmap", "loop"):
            theta = fastntk.ntk(m, x, bn=bn, method=method, dtype=torch.float64)
            assert rel_err(theta, reduce(full_kernel(m, x, bn=bn), "sum")) <= TOL64, (bn, method)
    sync = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.SyncBatchNorm(3), nn.Flatten(), nn.Linear(48, 2)
    ).double()
    theta = fastntk.ntk(sync, x, bn="per_sample", dtype=torch.float64)  # torch's own: replaced
    assert rel_err(theta, reduce(full_kernel(sync, x, bn="per_sample"), "sum")) <= TOL64


class _ScaleHeld(nn.Module):
    """Holds ``gamma`` but never uses it: the parent does (a layer scale, a temperature)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        self.gamma = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.sin(x * self.w)


class _HeldByChild(nn.Module):
    def __init__(self, child, use):
        super().__init__()
        self.b, self.h, self.use = child, nn.Linear(4, 2), use

    def forward(self, x):
        scale = self.b.gamma if hasattr(self.b, "gamma") else self.b.extra
        h = torch.tanh(self.b(x))
        return self.h(h * scale if self.use == "scale" else h / (2 + scale.sin()))


def _linear_with_extra():
    lin = nn.Linear(4, 4)
    lin.register_parameter("extra", nn.Parameter(torch.randn(4)))
    return lin


@pytest.mark.parametrize("use", ["scale", "div"])
@pytest.mark.parametrize("make", [_ScaleHeld, _linear_with_extra], ids=["user-module", "linear"])
def test_parameter_its_module_holds_but_only_the_parent_uses(make, use):
    """One use, one call of its module, so the count (uses > calls) took the use as inside
    the call: the module's fallback re-ran a forward without it, and the kernel missed it
    (zero for that parameter alone; helper-24). A use is inside a call only when the
    graph reaches it from the call's outputs without passing its inputs; this one is not,
    so the parameter takes its node rule (``* scale``: rules.nodes.ScaleRule) or else the
    whole-model fallback (``/ (2 + sin(scale))``: no node rule), both exact."""
    torch.manual_seed(0)
    m = _HeldByChild(make(), use).double()
    held = "b.gamma" if hasattr(m.b, "gamma") else "b.extra"
    x1, x2 = _x(4, 4), _x(3, 4, seed=2)
    for params in (None, [held]):
        ref = reference_ntk_of(m, x1, x2, params)
        for method in ("auto", "layerwise", "vmap", "loop"):
            theta = fastntk.ntk(m, x1, x2, params=params, method=method, dtype=torch.float64)
            assert rel_err(theta, ref) <= TOL64, (params, method)
    paths = {p.name: p.path for p in fastntk.explain(m, x1).params}
    assert paths[held].startswith("rule:ScaleRule" if use == "scale" else "fallback:model"), paths
    assert paths["h.weight"] == "rule:LinearRule"


def reference_ntk_of(m, x1, x2, params):
    return reduce(full_kernel(m, x1, x2, params=params), "sum")


class _Dense64(nn.Module):
    """No rule: dense per-sample gradient blocks (what a panel keeps)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)

    def forward(self, x):
        return torch.tanh(x @ self.w)


@pytest.mark.parametrize(
    "output, panel_rows", [("sum", 16), ("trace", 4), ("mean", 4), ("full", 4)]
)
def test_panels_keep_the_per_sample_gradients_of_every_pass_within_the_budget(
    monkeypatch, output, panel_rows
):
    """A panel keeps each backward pass's per-sample gradients: "trace" over K logits
    keeps K per sample, but the panel's rows were sized for one, so a "trace" panel held K
    times its budget (NB201, N=1024: about 34 GB of per-sample gradients). The rows now
    count every pass; here a budget of 16 samples' one-pass gradients gives panels of 16
    rows for "sum" and of one chunk (4) for the K = 10 passes of "trace"/"mean"/"full"."""
    from fastntk.engine import sizes
    from fastntk.engine.layerwise import Layerwise

    torch.manual_seed(0)
    m = nn.Sequential(_Dense64(), nn.Linear(6, 10)).double()
    x = _x(32, 6)
    P = sum(p.numel() for p in m.parameters())
    monkeypatch.setattr(sizes, "PANEL_BYTES", 16 * P * 8)
    runs = []
    real = Layerwise.run_chunk
    monkeypatch.setattr(
        Layerwise,
        "run_chunk",
        lambda self, xc, *a, **k: (runs.append(xc.shape[0]), real(self, xc, *a, **k))[1],
    )
    theta = fastntk.ntk(m, x, output=output, chunk_size=4, dtype=torch.float64, progress=False)
    assert rel_err(theta, reduce(full_kernel(m, x), output)) <= TOL64
    n_panels = 32 // panel_rows
    # each panel's own chunks, then the chunks of the columns after it (symmetric kernel)
    assert len(runs) == 32 // 4 + sum((32 - (i + 1) * panel_rows) // 4 for i in range(n_panels))
    est = fastntk.explain(m, x, output=output, chunk_size=4)
    assert est.panel_bytes == 2 * panel_rows * P * 8 * (1 if output == "sum" else 10)


def test_explain_reports_what_the_call_does():
    """explain probed two samples where ntk probes its first chunk, so a coupling in a
    later sample went unseen (it reported rules, ntk took the batch graph), and a module
    called under torch.no_grad() was reported with its rule though no gradient reaches it
    (helper-24)."""

    class Later(nn.Module):
        def __init__(self):
            super().__init__()
            self.u, self.h = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.u(x)
            return self.h(h - h[2:].mean(0))  # samples 2.. couple everything

    class NoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.h = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            with torch.no_grad():
                z = self.l(x)
            return self.h(x + z)

    torch.manual_seed(0)
    m = Later().double()
    x = _x(5, 3)
    report = fastntk.explain(m, x)
    assert report.coupled and {p.path for p in report.params} == {"coupled"}
    _check(m, x, methods=["auto", "loop"])
    m = NoGrad().double()
    paths = {p.name: p.path for p in fastntk.explain(m, _x(3, 4)).params}
    assert paths["l.weight"].startswith("unused") and paths["h.weight"] == "rule:LinearRule"
    _check(m, _x(3, 4))


def test_explain_names_each_path_of_a_tied_weight():
    """A weight tied across module types takes each call's own path (an embedding's rule
    and a linear's); explain named only its owner's."""
    import zoo

    m, x1, _ = zoo.make("tied")
    paths = {p.name: p.path for p in fastntk.explain(m, x1).params}
    assert (
        paths["emb.weight"]
        == "rule:EmbeddingRule + rule:LinearRule (used several times: exact sum of uses)"
    )
    with fastntk.profile() as prof:
        fastntk.ntk(m, x1)
    assert prof.seconds.get("fallback", 0) == 0  # both uses by rules, as reported


@pytest.mark.parametrize("output", ["trace", "full"])
def test_panels_of_a_model_that_needs_its_whole_chunk(output):
    """The panel's K came from a forward of two samples, which a model grouping its samples
    in fours cannot run: a raw RuntimeError where the batch graph served it before
    (helper-27). K now comes from a forward of the first chunk."""

    class Groups4(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.o = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.l(x)).view(-1, 4, 6)
            return self.o((h - h.mean(1, keepdim=True)).reshape(-1, 6))

    torch.manual_seed(0)
    m = Groups4().double()
    x = _x(8, 5)
    ref = reduce(full_kernel(m, x), output)
    for method in ("auto", "layerwise"):
        theta = fastntk.ntk(
            m, x, output=output, chunk_size=4, method=method, dtype=torch.float64, progress=False
        )
        assert rel_err(theta, ref) <= TOL64, method


@pytest.mark.parametrize(
    "bn_cls,shape",
    [
        (nn.BatchNorm1d, (5, 3, 7)),
        (nn.BatchNorm2d, (5, 3, 4, 4)),
        (nn.BatchNorm3d, (5, 3, 2, 3, 3)),
    ],
)
@pytest.mark.parametrize("method", ["auto", "layerwise", "vmap"])
def test_per_sample_batchnorm_of_every_rank(bn_cls, shape, method):
    """bn="per_sample" normalises each sample's channels over its own positions (a
    GroupNorm with one group per channel in the engine) for 1-d, 2-d and 3-d positions,
    against the oracle's each-sample-alone train-mode BatchNorm."""
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(shape) - 2]
    m = nn.Sequential(conv(3, 4, 1), bn_cls(4), nn.Tanh(), nn.Flatten(),
                      nn.LazyLinear(2)).double()  # fmt: skip
    x = torch.randn(*shape, dtype=torch.float64)
    m(x)  # (materialises the lazy layer)
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    got = fastntk.ntk(m, x, bn="per_sample", method=method)
    want = reduce(full_kernel(m, x, bn="per_sample"), "sum")
    assert rel_err(got, want) < TOL[torch.float64]
