"""``fastntk.ntk_operator`` and ``fastntk.ntk_diag`` held to the float64 oracle kernel:
products Θ V and Θᵀ V for every output mode, cross operators and the BN modes (the
coupled ``bn="batch"`` too) on the oracle tests' zoo; chunked streaming; the diagonal;
bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zoo
from reference import TOL, full_kernel, reduce, rel_err

import fastntk
from fastntk.errors import InputError, InputTypeError, OptionError

TOL64 = TOL[torch.float64]
OUTPUTS = ["sum", "trace", "mean", "full", 1]


def _dense(full: torch.Tensor, output) -> torch.Tensor:
    """The oracle kernel as the operator's matrix: "full" flattened sample-major."""
    if output == "full":
        n1, n2, K, _ = full.shape
        return full.permute(0, 2, 1, 3).reshape(n1 * K, n2 * K)
    if isinstance(output, int):
        return full[:, :, output, output]
    return reduce(full, output)


def _V(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", zoo.ZOO)
@pytest.mark.parametrize("output", OUTPUTS)
def test_products_match_the_dense_kernel(name, output):
    m, x1, x2 = zoo.make(name)
    m = m.double()
    x1 = x1.double() if x1.is_floating_point() else x1
    x2 = x2.double() if x2.is_floating_point() else x2
    for other in (None, x2):
        A = fastntk.ntk_operator(m, x1, other, output=output, dtype=torch.float64)
        D = _dense(full_kernel(m, x1, other), output)
        assert A.shape == tuple(D.shape)
        V, U = _V(D.shape[1], 3), _V(D.shape[0], 2, seed=1)
        assert rel_err(A @ V, D @ V) <= TOL64, (name, output, other is None)
        assert rel_err(A @ V[:, 0], D @ V[:, 0]) <= TOL64  # a vector
        assert rel_err(A.T @ U, D.T @ U) <= TOL64  # the transpose
        assert A.products == 4 and A.T.products == 2


@pytest.mark.parametrize("name", zoo.BN_ZOO)
@pytest.mark.parametrize("bn", ["per_sample", "batch"])
@pytest.mark.parametrize("output", ["sum", "full"])
def test_products_in_the_batchnorm_modes(name, bn, output):
    m, x1, x2 = zoo.make(name)
    m, x1, x2 = m.double(), x1.double(), x2.double()
    for other in (None, x2):
        A = fastntk.ntk_operator(m, x1, other, output=output, bn=bn, dtype=torch.float64)
        D = _dense(full_kernel(m, x1, other, bn=bn), output)
        V, U = _V(D.shape[1], 2), _V(D.shape[0], 2, seed=1)
        assert rel_err(A @ V, D @ V) <= TOL64, (name, bn, output)
        assert rel_err(A.T @ U, D.T @ U) <= TOL64


def test_products_stream_over_chunks():
    """Sides of several chunks (the graphs built per product), and of one (kept)."""
    m, x1, x2 = zoo.make("resnet", n=7)
    m, x1, x2 = m.double(), x1.double(), x2.double()
    D = reduce(full_kernel(m, x1, x2, bn="per_sample"), "trace")
    A = fastntk.ntk_operator(m, x1, x2, output="trace", bn="per_sample", chunk_size=3,
                             dtype=torch.float64)  # fmt: skip
    V = _V(D.shape[1], 4)
    assert rel_err(A @ V, D @ V) <= TOL64
    assert rel_err(A @ V, D @ V) <= TOL64  # again (nothing stale)


class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward and no forward derivative (no ``jvp``)."""

    generate_vmap_rule = True  # (the oracle is torch.func's jacrev)

    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


class _Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.b(_NoForwardAD.apply(self.a(x)))


class _FunctionalPadding(torch.nn.Module):
    """``F.embedding`` with a ``padding_idx`` outside any module, its table used again: the
    backward leaves the padding row without gradient, forward mode would not."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)  # (its padding_idx: None)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, idx):
        w = self.emb.weight
        h = torch.nn.functional.embedding(idx, w, padding_idx=0).mean(1)
        return self.fc(torch.tanh(h)) + (h @ w.T)[:, :3]


def test_forward_mode_checked_against_the_double_backward():
    """The first forward-mode product is compared with the double backward's: a model
    whose backward is not its derivative by convention keeps the double backward."""
    torch.manual_seed(0)
    m = _FunctionalPadding().double()
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randint(0, 11, (5, 4), generator=g), torch.randint(0, 11, (3, 4), generator=g)
    x1[:, 0] = 0  # padding tokens
    A = fastntk.ntk_operator(m, x1, x2, chunk_size=2, dtype=torch.float64)
    D = _dense(full_kernel(m, x1, x2), "sum")
    V = _V(D.shape[1], 2)
    assert A.forward_mode
    assert rel_err(A @ V, D @ V) <= TOL64
    assert not A.forward_mode
    assert rel_err(A @ V, D @ V) <= TOL64


@pytest.mark.parametrize("name", zoo.ZOO + ["custom"])
@pytest.mark.parametrize("output", ["sum", "full"])
def test_streamed_products_by_forward_mode(name, output):
    """Sides of several chunks (chunks of 2, no graph kept): J u by forward-mode AD, or,
    for an op without a forward derivative (a custom autograd.Function), by the double
    backward, in a cross operator and its transpose."""
    if name == "custom":
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        m, x1, x2 = _Custom(), torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    else:
        m, x1, x2 = zoo.make(name, n=5)
    m = m.double()
    x1 = x1.double() if x1.is_floating_point() else x1
    x2 = x2.double() if x2.is_floating_point() else x2
    A = fastntk.ntk_operator(m, x1, x2, output=output, chunk_size=2, dtype=torch.float64)
    D = _dense(full_kernel(m, x1, x2), output)
    V, U = _V(D.shape[1], 2), _V(D.shape[0], 2, seed=1)
    assert rel_err(A @ V, D @ V) <= TOL64
    assert rel_err(A.T @ U, D.T @ U) <= TOL64
    # (the custom Function has no forward derivative; the tied LM's embedding has a
    # padding_idx, whose row its backward leaves without gradient)
    assert A.forward_mode == (name not in ("custom", "tied"))


def test_scipy_operator():
    from scipy.sparse.linalg import LinearOperator

    m, x1, _ = zoo.make("mlp", n=6)
    m = m.double()
    A = fastntk.ntk_operator(m, x1.double(), dtype=torch.float64)
    L = A.to_scipy()
    assert isinstance(L, LinearOperator) and L.shape == (6, 6)
    D = reduce(full_kernel(m, x1.double()), "sum").numpy()
    v = np.arange(6.0)
    assert np.allclose(L @ v, D @ v, rtol=1e-10, atol=0)
    assert np.allclose(L.rmatvec(v), D.T @ v, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", zoo.ZOO)
@pytest.mark.parametrize("output", ["sum", "trace", "mean", "full"])
def test_diag_is_the_kernels_diagonal(name, output):
    m, x1, _ = zoo.make(name)
    m = m.double()
    x1 = x1.double() if x1.is_floating_point() else x1
    full = full_kernel(m, x1)
    d = fastntk.ntk_diag(m, x1, output=output, dtype=torch.float64)
    if output == "full":
        want = torch.stack([full[i, i] for i in range(full.shape[0])])
    else:
        want = reduce(full, output).diagonal()
    assert rel_err(d, want) <= TOL64, (name, output)


@pytest.mark.parametrize("bn", ["per_sample", "batch"])
def test_diag_in_the_batchnorm_modes_and_chunks(bn):
    m, x1, _ = zoo.make("nb201", n=5)
    m, x1 = m.double(), x1.double()
    want = reduce(full_kernel(m, x1, bn=bn), "trace").diagonal()
    d = fastntk.ntk_diag(m, x1, output="trace", bn=bn, chunk_size=2, dtype=torch.float64)
    assert rel_err(d, want) <= TOL64


def test_bad_inputs():
    m, x1, _ = zoo.make("mlp")
    A = fastntk.ntk_operator(m, x1)
    with pytest.raises(InputError, match=r"shape \(4,\) or \(4, k\)"):
        A @ torch.ones(5)
    with pytest.raises(InputTypeError, match="floating-point"):
        A @ torch.ones(4, dtype=torch.long)
    with pytest.raises(InputTypeError, match="tensor"):
        A @ [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(TypeError):
        fastntk.ntk_operator(m, x1, method="vmap")  # not an option of the operator
    with pytest.raises(OptionError):
        fastntk.ntk_operator(m, x1, output="nope")
    with pytest.raises(OptionError):
        fastntk.ntk_diag(m, x1, bn="nope")


def test_metrics_from_the_operator_within_their_stated_bounds():
    """λmax, trace, ‖Θ − μ‖_F (Hutch++), LGA, S_t from the operator against the same
    metrics of the dense float64 kernel: each within its stated bound (fixed seeds), the
    exact ones equal."""
    from fastntk.metrics import kernel as KM
    from fastntk.metrics import operator as OM

    m, x, _ = zoo.make("nb201", n=24)
    m, x = m.double(), x.double()
    y = torch.arange(24) % 4
    D = reduce(full_kernel(m, x, bn="per_sample"), "sum")
    A = fastntk.ntk_operator(m, x, bn="per_sample", dtype=torch.float64)
    d = fastntk.ntk_diag(m, x, bn="per_sample", dtype=torch.float64)
    slack = 1e-9 * float(D.abs().max())
    lam, est = OM.top_eigenvalues(A, 3)
    true = torch.linalg.eigvalsh(D).flip(0)[:3].numpy()
    assert np.abs(lam - true).max() <= est.bound + slack and est.products > 0
    tr = OM.trace(d)
    assert tr.exact and abs(tr.value - float(D.trace())) <= slack
    mu = float(D.mean())
    F = OM.frobenius(A, shift=mu, sketch=4, samples=8, seed=3)
    assert not F.exact and abs(F.value - float((D - mu).norm())) <= F.bound + slack
    assert F.products == 2 * 4 + 8
    L = OM.lga(A, y, sketch=4, samples=8, seed=3)
    assert abs(L.value - KM.lga(D, y)) <= L.bound + 1e-9
    St = OM.trainability(A, d)
    assert abs(St.value - KM.trainability(D)) <= St.bound + 1e-9
    full = OM.frobenius(A, sketch=24)  # a sketch as wide as N: exact
    assert full.exact and abs(full.value - float(D.norm())) <= slack


def test_kernel_regression_by_conjugate_gradients():
    from fastntk.metrics import ntkscore
    from fastntk.metrics import operator as OM

    m, x, _ = zoo.make("nb201", n=20)
    m, x = m.double(), x.double()
    y = torch.arange(20) % 4
    xt, yt = x[:12], y[:12]
    xs, ys = x[12:], y[12:]
    s_e, s_g = OM.regression_scores(m, xt, yt, xs, ys, num_classes=4, bn="per_sample",
                                    dtype=torch.float64)  # fmt: skip
    K = full_kernel(m, torch.cat([xt, xs, ntkscore.perturb(xs, 1e-2, 0)]), bn="per_sample")
    K = reduce(K, "sum")
    want_e, want_g = ntkscore.regression_scores(K[:12, :12], K[12:20, :12], K[20:, :12], yt, ys,
                                                4, 1e-6)  # fmt: skip
    assert abs(s_g.value - want_g) <= s_g.bound + 1e-6 * abs(want_g)
    assert abs(s_e.value - want_e) <= s_e.bound + 1e-6 * abs(want_e)


def test_compute_metrics_on_the_operator_path():
    """``path="operator"``: the mean exact, the estimates as ``fastntk.metrics.operator``
    gives them (same seeds); ncn refused with the dense path named; ``path="auto"`` is
    the dense kernel below ``OPERATOR_MIN_N`` samples."""
    from fastntk.metrics import compute_metrics
    from fastntk.metrics import operator as OM

    m, x, _ = zoo.make("nb201", n=16)
    m, x = m.double(), x.double()
    y = torch.arange(16) % 4
    kw = dict(bn="per_sample", dtype=torch.float64)
    got = compute_metrics(m, x, y, "mean,fnorm,lga,num_params", path="operator", **kw)
    dense = compute_metrics(m, x, y, "mean,fnorm,lga,num_params", path="dense", **kw)
    assert abs(got["mean"] - dense["mean"]) <= 1e-10 * abs(dense["mean"])
    assert got["num_params"] == dense["num_params"]
    A = fastntk.ntk_operator(m, x, **kw)
    F = OM.frobenius(A)
    assert got["fnorm"] == F.value and abs(F.value - dense["fnorm"]) <= F.bound + 1e-9
    L = OM.lga(fastntk.ntk_operator(m, x, **kw), y)
    assert got["lga"] == L.value and abs(L.value - dense["lga"]) <= L.bound + 1e-9
    with pytest.raises(InputError, match="path='dense'"):
        compute_metrics(m, x, y, "ncn", path="operator", **kw)
    assert compute_metrics(m, x, y, "lga", path="auto", **kw) == {"lga": dense["lga"]}
    with pytest.raises(OptionError, match="path"):
        compute_metrics(m, x, y, "lga", path="sparse", **kw)
