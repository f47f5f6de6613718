"""Models outside the usual mould, each once silently wrong or crashing: held to the oracle.

Every case here was found by fuzzing the engine against the float64 oracle: layers fed
sequence-first tensors inside a batch-first model, modules called on tensors with no
batch dimension, user forward hooks that change an output, modules whose outputs feed
each other, blocks split into parameter-row ranges across chunks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from reference import full_kernel, reduce, rel_err

import fastntk
from fastntk.errors import UnsupportedError

TOL64 = 1e-10
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
    emb = (nn.EmbeddingBag(10, 4, mode="sum", **kw) if bag else nn.Embedding(10, 4, **kw))
    with torch.no_grad():
        emb.weight.mul_(3)  # rows longer than max_norm
    m = nn.Sequential(emb, nn.Flatten(), nn.Linear(4 if bag else 12, 2))
    x = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    before = emb.weight.detach().clone()
    for call in (lambda: fastntk.ntk(m, x), lambda: fastntk.explain(m, x),
                 lambda: fastntk.ntk_sketch(m, x, sketch_dim=8)):  # fmt: skip
        with pytest.raises(UnsupportedError, match="max_norm" if kw.get("max_norm") else "scale_grad"):
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
