"""Tests of fastntk.metrics: each metric against an independent numpy implementation
of the paper's formula, known cases, bad inputs, and the model-level functions."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastntk import metrics as M
from fastntk.errors import InputError, InputTypeError, NonFiniteKernelError, OptionError
from fastntk.metrics import model_kernels as MK

SIZES = [1, 7, 10, 33]
SIZES_GE2 = [7, 10, 33]


# ---------------------------------------------------------------------------------------
# independent numpy references (written from the papers, not from fastntk.metrics)
# ---------------------------------------------------------------------------------------


def np_lga(K, y):
    """LGA paper Eq. 12, literally: centred Θ and L, Frobenius inner product over norms."""
    K = np.asarray(K, dtype=np.float64)
    y = np.asarray(y)
    L = np.where(y[:, None] == y[None, :], 1.0, -1.0)
    Kc = K - K.mean()
    Lc = L - L.mean()
    return float((Kc * Lc).sum() / (np.sqrt((Kc**2).sum()) * np.sqrt((Lc**2).sum())))


def np_trainability(K):
    """NTK-score Eq. 5: top-ceil(sqrt n) eigenvalues over all, eigenvalues descending."""
    lam = np.sort(np.linalg.eigvalsh(np.asarray(K, dtype=np.float64)))[::-1]
    k = int(np.ceil(np.sqrt(len(lam))))
    return float(lam[:k].sum() / lam.sum())


def np_cond(K):
    lam = np.linalg.eigvalsh(np.asarray(K, dtype=np.float64))
    return float(lam[-1] / lam[0])


def random_spd(n, seed, dtype=torch.float64):
    g = np.random.default_rng(seed)
    A = g.standard_normal((n, n + 3))
    K = A @ A.T + 0.1 * np.eye(n) + 0.5  # a positive mean, like a NTK
    return torch.tensor(K, dtype=dtype)


# ---------------------------------------------------------------------------------------
# kernel-level metrics vs references
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_fnorm_mean_spectrum_match_numpy(n):
    K = random_spd(n, n)
    Kn = K.numpy()
    assert M.fnorm(K) == pytest.approx(np.sqrt((Kn**2).sum()), rel=1e-12)
    assert M.mean(K) == pytest.approx(Kn.sum() / n**2, rel=1e-12)
    lam = M.spectrum(K)
    assert lam.dtype == torch.float64
    np.testing.assert_allclose(lam.numpy(), np.linalg.eigvalsh(Kn), rtol=1e-10, atol=1e-10)
    assert bool(torch.all(lam[1:] >= lam[:-1]))


@pytest.mark.parametrize("n", SIZES)
def test_condition_number_and_ncn_match_numpy(n):
    K = random_spd(n, 100 + n)
    assert M.condition_number(K) == pytest.approx(np_cond(K.numpy()), rel=1e-9)
    assert M.ncn(K) == pytest.approx(-np_cond(K.numpy()), rel=1e-9)


@pytest.mark.parametrize("n", SIZES)
def test_trainability_matches_eq5(n):
    K = random_spd(n, 200 + n)
    assert M.trainability(K) == pytest.approx(np_trainability(K.numpy()), rel=1e-10)


@pytest.mark.parametrize("n", SIZES_GE2)
def test_lga_matches_eq12(n):
    K = random_spd(n, 300 + n)
    y = np.random.default_rng(n).integers(0, 3, n)
    y[:2] = [0, 1]  # at least two classes
    assert M.lga(K, torch.tensor(y)) == pytest.approx(np_lga(K.numpy(), y), abs=1e-12)
    assert M.lga(K, y) == pytest.approx(np_lga(K.numpy(), y), abs=1e-12)  # array-like labels


@pytest.mark.parametrize("n", SIZES_GE2)
def test_kernel_evolution_measures_match_numpy(n):
    K0 = random_spd(n, 400 + n)
    Kt = random_spd(n, 500 + n)
    a, b = K0.numpy().ravel(), Kt.numpy().ravel()
    assert M.kernel_correlation(K0, Kt) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    expect = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert M.relative_kernel_difference(K0, Kt) == pytest.approx(expect, rel=1e-12)
    assert M.kernel_correlation(K0, K0) == pytest.approx(1.0)
    assert M.relative_kernel_difference(K0, K0) == 0.0


def test_float32_kernel_is_accepted_and_computed_in_float64():
    K = random_spd(10, 1)
    assert M.condition_number(K.float()) == pytest.approx(np_cond(K.numpy()), rel=1e-5)
    assert isinstance(M.fnorm(K.float()), float)


# ---------------------------------------------------------------------------------------
# known cases
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_identity_kernel(n):
    K = torch.eye(n)
    assert M.condition_number(K) == 1.0
    assert M.ncn(K) == -1.0
    assert M.fnorm(K) == pytest.approx(math.sqrt(n))
    assert M.mean(K) == pytest.approx(1.0 / n)
    assert M.trainability(K) == pytest.approx(math.ceil(math.sqrt(n)) / n)


def test_rank_one_kernel():
    v = torch.arange(1.0, 11.0, dtype=torch.float64)
    K = torch.outer(v, v)
    assert M.condition_number(K) == math.inf  # documented: singular -> inf
    assert M.ncn(K) == -math.inf
    assert M.condition_number(K, singular="nonzero") == pytest.approx(1.0)
    with pytest.raises(InputError, match="singular"):
        M.condition_number(K, singular="raise")
    assert M.trainability(K) == pytest.approx(1.0)
    assert M.fnorm(K) == pytest.approx(float(v @ v))


def test_near_singular_float32_rounding_is_clamped_not_nan():
    # rank-2 kernel in float32: the zero eigenvalues come out as +-1e-6-ish rounding
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 2, generator=g)
    K = (A @ A.T).float()
    assert M.condition_number(K) == math.inf
    c = M.condition_number(K, singular="nonzero")
    assert math.isfinite(c) and c >= 1.0
    assert 0.0 < M.trainability(K) <= 1.0


def test_lga_perfectly_aligned_and_invariances():
    y = torch.tensor([0, 0, 1, 2, 1, 2, 2, 0])
    L = M.label_matrix(y)
    assert M.lga(L, y) == pytest.approx(1.0)
    assert M.lga(-L, y) == pytest.approx(-1.0)
    assert M.lga(3.0 * L + 7.0, y) == pytest.approx(1.0)  # scale and shift invariant
    K = random_spd(8, 3)
    assert M.lga(5 * K + 2, y) == pytest.approx(M.lga(K, y))


# ---------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn", [M.fnorm, M.mean, M.condition_number, M.ncn, M.trainability, M.spectrum]
)
def test_bad_kernels_raise(fn):
    with pytest.raises(InputError, match="square"):
        fn(torch.ones(3, 4))
    with pytest.raises(InputError, match="empty"):
        fn(torch.ones(0, 0))
    with pytest.raises(InputError, match="2-D"):
        fn(torch.ones(3))
    bad = torch.eye(3)
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteKernelError):
        fn(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(NonFiniteKernelError):
        fn(bad)


def test_spectral_metrics_reject_indefinite_and_asymmetric():
    K = torch.diag(torch.tensor([3.0, 1.0, -0.5], dtype=torch.float64))
    for fn in (M.condition_number, M.trainability):
        with pytest.raises(InputError, match="indefinite"):
            fn(K)
    with pytest.raises(InputError, match="positive eigenvalue"):
        M.condition_number(torch.zeros(4, 4))
    A = torch.tensor([[2.0, 1.0], [0.0, 2.0]])
    with pytest.raises(InputError, match="symmetric"):
        M.condition_number(A)
    with pytest.raises(OptionError):
        M.condition_number(torch.eye(3), singular="bogus")


def test_lga_bad_labels():
    K = random_spd(6, 0)
    with pytest.raises(InputError, match="entries"):
        M.lga(K, torch.tensor([0, 1, 0]))
    with pytest.raises(InputError, match="two classes"):
        M.lga(K, torch.zeros(6, dtype=torch.long))
    with pytest.raises(InputError, match="constant"):
        M.lga(torch.ones(6, 6), torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(InputError, match="1-D"):
        M.lga(K, torch.zeros(6, 1, dtype=torch.long))


def test_kernel_pair_shape_mismatch():
    with pytest.raises(InputError, match="shapes differ"):
        M.kernel_correlation(torch.eye(3), torch.eye(4))
    with pytest.raises(InputError, match="undefined"):
        M.relative_kernel_difference(torch.zeros(3, 3), torch.eye(3))


# ---------------------------------------------------------------------------------------
# Borda
# ---------------------------------------------------------------------------------------


def test_borda_hand_made_table_with_ties():
    scores = [[1.0, 5.0], [2.0, 5.0], [3.0, 1.0]]
    # col 0 higher better: ranks 1, 2, 3; col 1 lower better: 5, 5 tie -> 1.5, 1.5; 1 -> 3
    np.testing.assert_allclose(M.borda(scores, [True, False]), [2.5, 3.5, 6.0])
    np.testing.assert_allclose(M.borda(scores, True), [3.5, 4.5, 4.0])
    # all tied: everyone gets the average rank
    np.testing.assert_allclose(M.borda([[4.0], [4.0], [4.0], [4.0]], True), [2.5] * 4)


def test_borda_is_order_independent_and_handles_nan_inf():
    g = np.random.default_rng(0)
    table = g.integers(0, 4, size=(9, 3)).astype(float)  # many ties
    dirs = [True, False, True]
    tot = M.borda(table, dirs)
    perm = g.permutation(9)
    np.testing.assert_allclose(M.borda(table[perm], dirs), tot[perm])
    col = [1.0, float("nan"), -math.inf, 2.0]
    np.testing.assert_allclose(M.borda(col, True), [3.0, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(M.borda(col, False), [3.0, 1.0, 4.0, 2.0])


def test_borda_bad_input():
    with pytest.raises(InputError):
        M.borda([[1.0, 2.0]], [True])
    with pytest.raises(InputError):
        M.borda(np.zeros((0, 2)), True)


def test_running_borda_is_borda_scores_of_the_set_so_far():
    """RunningBorda reads off borda_scores of every entry added so far, exactly (halves
    for ties), for each entry, as the set grows: ties, NaN, +-inf and missing metrics."""
    from fastntk.metrics.ranking import RunningBorda, borda_scores

    g = np.random.default_rng(1)
    pool = [0.0, 1.0, 1.0, 2.0, -math.inf, math.inf, float("nan"), -0.0, 3.5]
    dirs = {"a": True, "b": False, "c": True}
    entries = []
    for i in range(40):
        e = {m: float(g.choice(pool)) for m in dirs}
        if i % 7 == 3:
            del e["c"]  # a missing metric is NaN
        entries.append(e)
    running = RunningBorda(dirs)
    for n, e in enumerate(entries, start=1):
        running.add(e)
        assert len(running) == n
        want = borda_scores(entries[:n], dirs)
        assert [running.borda(x) for x in entries[:n]] == want
    with pytest.raises(InputError, match="add\\(\\) it first"):
        running.borda({"a": 0.5, "b": 0.0, "c": 0.0})


def test_registry_and_directions():
    assert set(M.DIRECTIONS) == set(M.METRICS)
    for name in ["fnorm", "mean", "ncn", "lga"]:
        assert M.DIRECTIONS[name] is True
    assert M.DIRECTIONS["cond"] is False and M.DIRECTIONS["generalization"] is False
    assert M.DIRECTIONS["expressivity"] is M.EXPRESSIVITY_HIGHER_IS_BETTER
    with pytest.raises(OptionError, match="unknown metric"):
        M.compute_metrics(nn.Linear(2, 2), torch.randn(3, 2), None, ["nope"])


# ---------------------------------------------------------------------------------------
# model-level (real engine: fastntk.ntk)
# ---------------------------------------------------------------------------------------


def ref_ntk(model, x1, x2=None):
    """Per-sample-gradient loop, float64, eval mode, sum output, all parameters."""
    m = copy.deepcopy(model).double().eval()
    ps = [p for p in m.parameters() if p.requires_grad]

    def grads(x):
        rows = []
        for i in range(x.shape[0]):
            out = m(x[i : i + 1].double())
            out = out[-1] if isinstance(out, tuple) else out
            g = torch.autograd.grad(out.sum(), ps, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                        for gi, p in zip(g, ps, strict=True)
                    ]
                )
            )
        return torch.stack(rows)

    G1 = grads(x1)
    G2 = G1 if x2 is None else grads(x2)
    return G1 @ G2.T


def mlp(seed=0, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.training,
        [p.grad for p in model.parameters()],
    )


def assert_unchanged(model, snap):
    sd, training, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert model.training == training
    assert all(p.grad is None for p in model.parameters()) == all(g is None for g in grads)


def data(n, seed=0, shape=(5,), k=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    y = torch.arange(n) % k
    return x, y


def test_engine_is_the_real_one():
    from fastntk.engine import ntk

    assert callable(ntk)
    model = mlp()
    x, _ = data(5)
    torch.testing.assert_close(MK.ntk(model, x), ref_ntk(model, x), rtol=1e-10, atol=1e-10)


def test_compute_metrics_matches_kernel_functions_with_one_engine_call(monkeypatch):
    model = mlp()
    x, y = data(12)
    calls = []
    real = MK.ntk

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(MK, "ntk", counting)
    snap = snapshot(model)
    out = M.compute_metrics(model, x, y, ["fnorm", "mean", "ncn", "cond", "lga", "trainability"])
    assert len(calls) == 1
    assert_unchanged(model, snap)
    K = ref_ntk(model, x)
    assert out["fnorm"] == pytest.approx(M.fnorm(K), rel=1e-10)
    assert out["mean"] == pytest.approx(M.mean(K), rel=1e-10)
    assert out["cond"] == pytest.approx(M.condition_number(K), rel=1e-10)
    assert out["ncn"] == -out["cond"]
    assert out["lga"] == pytest.approx(np_lga(K.numpy(), y.numpy()), abs=1e-10)
    assert out["trainability"] == pytest.approx(np_trainability(K.numpy()), rel=1e-10)
    assert list(out) == ["fnorm", "mean", "ncn", "cond", "lga", "trainability"]


def np_ntk_score(Ktr, Kte, Kpe, ytr, yte, k, jitter=1e-6):
    Ktr, Kte, Kpe = (np.asarray(a, dtype=np.float64) for a in (Ktr, Kte, Kpe))
    Ytr = np.eye(k)[ytr] - 1.0 / k
    Yte = np.eye(k)[yte] - 1.0 / k
    A = np.linalg.solve(Ktr + jitter * np.mean(np.diag(Ktr)) * np.eye(len(Ktr)), Ytr)
    fte, fpe = Kte @ A, Kpe @ A

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ce = float(np.mean(-(softmax(fte) * np.log(softmax(fpe))).sum(1)))
    return np_trainability(Ktr), -ce, float(np.linalg.norm(fte - Yte))


def test_ntk_score_tiny_mlp_matches_reference_and_is_deterministic():
    model = mlp(1)
    xtr, ytr = data(10, 1)
    xte, yte = data(6, 2)
    snap = snapshot(model)
    s = M.ntk_score(model, xtr, ytr, xte, yte, num_classes=3, seed=3)
    assert_unchanged(model, snap)
    assert len(s) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in s)
    assert s == M.ntk_score(model, xtr, ytr, xte, yte, num_classes=3, seed=3)
    s_other = M.ntk_score(model, xtr, ytr, xte, yte, num_classes=3, seed=4)
    assert s_other[0] == s[0] and s_other[2] == s[2]  # the noise only enters S_e
    # against an independent float64 computation (same seeded noise)
    xpe = xte + 1e-2 * torch.randn(
        xte.shape, generator=torch.Generator().manual_seed(3), dtype=xte.dtype
    )
    ref = np_ntk_score(
        ref_ntk(model, xtr),
        ref_ntk(model, xte, xtr),
        ref_ntk(model, xpe, xtr),
        ytr.numpy(),
        yte.numpy(),
        3,
    )
    np.testing.assert_allclose(s, ref, rtol=1e-10, atol=0)
    assert 0.0 < s[0] <= 1.0 and s[1] < 0.0 and s[2] >= 0.0


def test_compute_metrics_split_equals_ntk_score():
    model = mlp(2)
    x, y = data(12, 5)
    out = M.compute_metrics(model, x, y, "ntk_score", num_classes=3, seed=1)
    assert list(out) == ["trainability", "expressivity", "generalization"]
    _, se, sg = M.ntk_score(model, x[:6], y[:6], x[6:], y[6:], num_classes=3, seed=1)
    assert out["expressivity"] == pytest.approx(se, rel=1e-10)
    assert out["generalization"] == pytest.approx(sg, rel=1e-10)


def test_ntk_score_bad_inputs():
    model = mlp()
    x, y = data(6)
    with pytest.raises(InputError, match="entries"):
        M.ntk_score(model, x, y[:4], x, y)
    with pytest.raises(InputError, match="out of range"):
        M.ntk_score(model, x, y, x, y, num_classes=2)
    with pytest.raises(OptionError):
        M.ntk_score(model, x, y, x, y, bn="weird")
    with pytest.raises(InputError, match="labels"):
        M.compute_metrics(model, x, None, ["lga"])


def test_kernel_evolution_leaves_model_unchanged_and_is_deterministic():
    model = mlp(3)
    model.train()
    x, y = data(16, 7)
    snap = snapshot(model)
    rng_before = torch.get_rng_state()
    ev = M.kernel_evolution(model, x, y, times=[2, 1], unit="step", batch_size=8, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert_unchanged(model, snap)
    assert ev.times == [0, 1, 2]
    assert ev.kernel_correlation[0] == pytest.approx(1.0)
    assert ev.relative_difference[0] == 0.0
    assert math.isnan(ev.train_loss[0]) and all(math.isfinite(v) for v in ev.train_loss[1:])
    assert ev.relative_difference[2] > 0.0
    assert ev.lga[0] == pytest.approx(np_lga(ref_ntk(model, x).numpy(), y.numpy()), abs=1e-10)
    ev2 = M.kernel_evolution(model, x, y, times=[2, 1], unit="step", batch_size=8, seed=0)
    assert ev2.lga == ev.lga and ev2.relative_difference == ev.relative_difference
    model.eval()
    snap = snapshot(model)
    M.kernel_evolution(model, x, y, times=[1], unit="epoch", batch_size=8)
    assert_unchanged(model, snap)


def test_highpass():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(M.highpass(x, 0.0), x)
    h = M.highpass(x, 0.1)
    torch.testing.assert_close(h.mean(dim=(2, 3)), torch.zeros(2, 3, dtype=torch.float64))
    const = torch.ones(1, 1, 6, 6)
    assert float(M.highpass(const, 0.01).abs().max()) < 1e-6
    with pytest.raises(InputError):
        M.highpass(torch.randn(4, 3), 0.1)


def test_vintk_tiny_cnn():
    model = tiny_cnn()
    x, _ = data(6, 3, shape=(3, 8, 8))
    snap = snapshot(model)
    Kvi = M.vintk_kernel(model, x, cutoff=0.25, beta=0.5)
    expect = ref_ntk(model, x) + 0.5 * ref_ntk(model, M.highpass(x, 0.25))
    torch.testing.assert_close(Kvi, expect, rtol=1e-10, atol=1e-10)
    v = M.vintk(model, x)
    assert_unchanged(model, snap)
    assert isinstance(v, float) and v <= -1.0
    assert v == M.vintk(model, x)
    assert M.compute_metrics(model, x, None, ["vintk"])["vintk"] == pytest.approx(v)


def test_compute_metrics_vintk_reuses_the_kernel(monkeypatch):
    model = tiny_cnn(1)
    x, y = data(6, 4, shape=(3, 8, 8))
    calls = []
    real = MK.ntk
    monkeypatch.setattr(MK, "ntk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = M.compute_metrics(model, x, y, ["fnorm", "lga", "vintk"])
    assert len(calls) == 2  # Θ(x, x) once, Θ(hp(x), hp(x)) once
    assert out["vintk"] == pytest.approx(M.vintk(model, x), rel=1e-9)


def test_ntk_score_batch_bn_uses_one_joint_batch():
    model = mlp(4)
    model.train()
    xtr, ytr = data(6, 8)
    xte, yte = data(4, 9)
    snap = snapshot(model)
    s = M.ntk_score(model, xtr, ytr, xte, yte, num_classes=3, bn="batch")
    assert_unchanged(model, snap)
    assert all(math.isfinite(v) for v in s)
    assert s[0] == pytest.approx(M.trainability(MK.ntk(model, xtr, bn="batch")), rel=1e-9)
    out = M.compute_metrics(model, xtr, ytr, ["fnorm", "ntk_score"], bn="batch", num_classes=3)
    assert out["fnorm"] == pytest.approx(M.fnorm(MK.ntk(model, xtr, bn="batch")), rel=1e-9)


def test_compute_metrics_errors_nan_covers_kernels_that_overflow():
    """errors="nan" (what a search uses): an architecture whose kernel overflows float32
    gets NaN metrics (ranked last) instead of stopping the search; float64 computes them."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1e20)  # kernel entries ~1e80: beyond float32
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    names = ["ncn", "lga", "ntk_score"]
    with pytest.raises(NonFiniteKernelError):
        M.compute_metrics(m, x, y, names)
    out = M.compute_metrics(m, x, y, names, errors="nan")
    assert len(out) == 5 and all(math.isnan(v) for v in out.values())
    out64 = M.compute_metrics(m, x, y, ["fnorm", "mean"], dtype=torch.float64)
    assert all(math.isfinite(v) for v in out64.values())


def test_metric_arguments_get_typed_errors():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    K = torch.eye(4) + 0.1
    for bad in ("x", float("nan"), -1.0, float("inf"), True):
        with pytest.raises(OptionError, match="rtol"):
            M.ncn(K, rtol=bad)
    with pytest.raises(InputTypeError, match="numeric scores"):
        M.borda([["a", "b"]], True)
    for bad in (None, 3, [1, 2]):
        with pytest.raises(OptionError, match="metric names"):
            M.expand_metrics(bad)
    with pytest.raises(InputError, match="per-sample shape"):
        M.compute_metrics(m, x, y, ["ntk_score"], x_test=torch.randn(4, 5), y_test=y[:4])
    with pytest.raises(InputError, match="per-sample shape"):
        M.ntk_score(m, x, y, torch.randn(4, 5), y[:4])
    with pytest.raises(OptionError, match="noise_std"):
        M.compute_metrics(m, x, y, ["ntk_score"], noise_std=-1)
    with pytest.raises(InputError, match="out of range"):
        M.kernel_evolution(m, x, torch.tensor([0, 1, 7, 0, 1, 2]), times=(1,), unit="step")
    with pytest.raises(OptionError, match="times"):
        M.kernel_evolution(m, x, y, times=["a"])


def test_metrics_take_token_ids():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    idx = torch.randint(0, 10, (6, 3), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = M.compute_metrics(m, idx, y, ["fnorm", "lga"])
    K = __import__("fastntk").ntk(m, idx, dtype=torch.float64)
    assert out["fnorm"] == pytest.approx(M.fnorm(K), rel=1e-5)


def test_model_level_metrics_use_the_computed_dtypes_tolerance():
    """compute_metrics, ntk_score and vintk judge a float32 kernel by float32 rounding, as
    the kernel-level functions do on the engine's kernel (they cast it to float64 first,
    so a rank-deficient kernel raised "indefinite" and an ill-conditioned one got a
    condition number made of rounding noise)."""
    import fastntk

    torch.manual_seed(0)
    model = nn.Linear(3, 2)  # P = 8 < N: Θ is singular
    x, y = torch.randn(32, 3), torch.arange(32) % 2
    K32 = fastntk.ntk(model, x)
    assert K32.dtype == torch.float32 and M.ncn(K32) == -math.inf
    out = M.compute_metrics(model, x, y, ["ncn", "trainability"])
    assert out["ncn"] == -math.inf and out["trainability"] == M.trainability(K32)
    assert M.ntk_score(model, x[:16], y[:16], x[16:], y[16:])[0] == M.trainability(K32[:16, :16])
    xi = torch.randn(16, 1, 2, 2)
    conv = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    assert M.vintk(conv, xi) == -math.inf
    assert M.compute_metrics(conv, xi, names=["vintk"]) == {"vintk": -math.inf}
    # the same kernels computed in float64 resolve what float32 cannot
    K64 = fastntk.ntk(model, x, dtype=torch.float64)
    out64 = M.compute_metrics(model, x, y, ["ncn"], dtype=torch.float64)
    assert out64["ncn"] == M.ncn(K64)


def test_expressivity_and_generalization_need_no_spectrum():
    """S_e and S_g are kernel regression (Eq. 6-10): a spectrum that S_t rejects (here
    rtol=0 on a kernel with rounding-negative eigenvalues) does not take them down."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(32, 3), torch.arange(32) % 2
    with pytest.raises(InputError, match="indefinite"):
        M.compute_metrics(model, x, y, ["trainability"], rtol=0.0)
    both = ["expressivity", "generalization"]
    strict = M.compute_metrics(model, x, y, both, rtol=0.0)
    assert strict == M.compute_metrics(model, x, y, both)
    assert all(math.isfinite(v) for v in strict.values())
    nan = M.compute_metrics(model, x, y, ["ntk_score"], rtol=0.0, errors="nan")
    assert math.isnan(nan["trainability"]) and nan["expressivity"] == strict["expressivity"]


def test_low_precision_kernels_whose_spectrum_cannot_be_resolved_raise():
    """rtol = N·eps reaches 1 for bfloat16 at N = 128: every eigenvalue, λmax included, was
    set to zero (cond inf for the identity, S_t NaN)."""
    assert M.condition_number(torch.eye(64, dtype=torch.bfloat16)) == 1.0
    assert M.trainability(torch.eye(64, dtype=torch.bfloat16)) == pytest.approx(8 / 64)
    for fn in (M.condition_number, M.trainability, M.ncn):
        with pytest.raises(InputError, match=r"bfloat16.*float32 or float64"):
            fn(torch.eye(128, dtype=torch.bfloat16))
    with pytest.raises(InputError, match="rtol = 1"):
        M.condition_number(torch.eye(4), rtol=1.0)
    assert M.condition_number(torch.eye(128, dtype=torch.bfloat16), rtol=0.01) == 1.0


def test_vintk_honours_singular():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    xi = torch.randn(16, 1, 2, 2)
    with pytest.raises(InputError, match="singular"):
        M.compute_metrics(conv, xi, names=["vintk"], singular="raise")
    with pytest.raises(InputError, match="singular"):
        M.vintk(conv, xi, singular="raise")
    Kvi = M.vintk_kernel(conv, xi)
    lam = np.linalg.eigvalsh(Kvi.numpy())
    tol = 16 * np.finfo(np.float32).eps * lam[-1]
    expect = -lam[-1] / lam[lam > tol][0]
    got = M.compute_metrics(conv, xi, names=["vintk"], singular="nonzero")["vintk"]
    assert got == pytest.approx(expect, rel=1e-9)
    with pytest.raises(OptionError, match="singular"):
        M.vintk(conv, xi, singular="never")


def test_regression_metric_arguments_and_token_ids():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    nan = float("nan")
    for kw in ({"jitter": nan}, {"noise_std": nan}, {"jitter": -1.0}, {"noise_std": math.inf}):
        with pytest.raises(OptionError, match=next(iter(kw))):
            M.ntk_score(m, x, y, x, y, **kw)
        with pytest.raises(OptionError, match=next(iter(kw))):
            M.compute_metrics(m, x, y, ["ntk_score"], **kw)
    with pytest.raises(OptionError, match="num_classes"):
        M.ntk_score(m, x, y, x, y, num_classes="3")
    xi = torch.randn(4, 1, 2, 2)
    conv = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    for kw in ({"cutoff": nan}, {"beta": nan}, {"beta": math.inf}):
        with pytest.raises(OptionError, match=next(iter(kw))):
            M.vintk(conv, xi, **kw)
    K = torch.eye(4) + 0.1
    assert M.ncn(K, rtol=np.float32(1e-3)) == M.ncn(K, rtol=1e-3)
    # token ids: S_e perturbs the inputs with noise, which ids cannot take; S_g can
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    idx = torch.randint(0, 10, (8, 3), generator=torch.Generator().manual_seed(1))
    yy = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with pytest.raises(InputError, match="token ids"):
        M.ntk_score(emb, idx[:4], yy[:4], idx[4:], yy[4:])
    with pytest.raises(InputError, match="token ids"):
        M.compute_metrics(emb, idx, yy, ["expressivity"])
    g = M.compute_metrics(emb, idx, yy, ["generalization"])["generalization"]
    assert (
        g == M.compute_metrics(emb, idx, yy, ["trainability", "generalization"])["generalization"]
    )
    assert math.isfinite(g)


@pytest.mark.parametrize("scale", [1e160, 1e200, 1e-170])
def test_entry_scale_does_not_overflow_the_scale_free_metrics(scale):
    """Sums of squares of entries near 1e160 overflowed (lga 0, correlation NaN, fnorm
    inf), near 1e-170 underflowed ("constant kernel")."""
    K, y = random_spd(12, 3), torch.arange(12) % 3
    K2 = random_spd(12, 4)
    assert M.lga(K * scale, y) == pytest.approx(M.lga(K, y), rel=1e-12)
    assert M.kernel_correlation(K * scale, K2 * scale) == pytest.approx(
        M.kernel_correlation(K, K2), rel=1e-12
    )
    assert M.fnorm(K * scale) / scale == pytest.approx(M.fnorm(K), rel=1e-12)
    assert M.relative_kernel_difference(K * scale, K2 * scale) == pytest.approx(
        M.relative_kernel_difference(K, K2), rel=1e-12
    )


@pytest.mark.parametrize("n, m, chunk", [(50, 8, 6), (20, 64, 8192), (7, 7, 1)])
def test_sketch_metrics_are_the_metrics_of_s_st(n, m, chunk):
    """metrics.sketch_metrics(S, y) equals each kernel metric of S Sᵀ without forming it."""
    g = torch.Generator().manual_seed(n)
    S = torch.randn(n, m, generator=g, dtype=torch.float64) + 0.3
    y = torch.randperm(n, generator=g) % 3
    K = S @ S.T
    got = M.sketch_metrics(S, y, chunk=chunk)
    want = {"fnorm": M.fnorm(K), "mean": M.mean(K), "lga": M.lga(K, y),
            "trainability": M.trainability(K)}  # fmt: skip
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-14), k
    assert "lga" not in M.sketch_metrics(S)
    # scale: entries of S near 1e100 (S Sᵀ near 1e200) and near 1e-100
    for scale in (1e100, 1e-100):
        big = M.sketch_metrics(S * scale, y, chunk=chunk)
        assert big["lga"] == pytest.approx(got["lga"], rel=1e-12)
        assert big["mean"] == pytest.approx(got["mean"] * scale**2, rel=1e-12)


def test_sketch_metrics_of_a_real_sketch():
    """On fastntk.ntk_sketch's output: the same values as the metrics of S Sᵀ."""
    import fastntk

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(40, 5)
    y = torch.arange(40) % 3
    S = fastntk.ntk_sketch(model, x, sketch_dim=32, seed=1, dtype=torch.float64)
    got = M.sketch_metrics(S, y)
    K = S @ S.T
    assert got["lga"] == pytest.approx(M.lga(K, y), rel=1e-12)
    assert got["trainability"] == pytest.approx(M.trainability(K), rel=1e-12)


def test_sketch_metrics_errors():
    S = torch.randn(6, 4)
    for bad in (torch.randn(6), torch.zeros(0, 4)):
        with pytest.raises(InputError, match="2-D"):
            M.sketch_metrics(bad)
    with pytest.raises(NonFiniteKernelError):
        M.sketch_metrics(torch.full((6, 4), float("nan")))
    with pytest.raises(InputError, match="zero"):
        M.sketch_metrics(torch.zeros(6, 4))
    g = torch.Generator().manual_seed(0)  # entries equal to 1e-9 of their size: not resolved
    near = torch.ones(6, 4, dtype=torch.float64) * 3e7 + torch.randn(
        6, 4, generator=g, dtype=torch.float64
    )
    with pytest.raises(InputError, match="not resolved in float64"):
        M.sketch_metrics(near, torch.arange(6) % 2)
    with pytest.raises(InputError, match="entries"):
        M.sketch_metrics(S, torch.arange(5))
    with pytest.raises(InputError, match="two classes"):
        M.sketch_metrics(S, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(OptionError, match="chunk"):
        M.sketch_metrics(S, chunk=0)


def test_ntk_score_of_a_network_whose_output_ignores_its_input():
    """A NAS-Bench-201 cell with no path from input to output has a constant kernel:
    kernel regression predicts the same for every input, and S_e and S_g scored it as
    the most expressive and best generalising, so Borda put dead cells first (a search
    with ntk_score returned one). Both are undefined there, as LGA: NaN, ranked last."""
    from fastntk.spaces import nb201

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 8, 8, generator=g), torch.arange(12) % 3
    dead = nb201.build_model("|none~0|+|avg_pool_3x3~0|nor_conv_3x3~1|+|none~0|avg_pool_3x3~1|none~2|",
                             C=4, N=1, num_classes=3)  # fmt: skip
    live = nb201.build_model("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|avg_pool_3x3~2|",
                             C=4, N=1, num_classes=3)  # fmt: skip
    K = MK.kernel_of(dead, x[:8], MK.ntk_kwargs("eval", None, "sum", torch.float64, None))
    assert float(K.max()) == float(K.min())  # the premise: a constant kernel
    with pytest.raises(InputError, match="Θ\\(train, train\\) is constant"):
        M.ntk_score(dead, x[:8], y[:8], x[8:], y[8:], dtype=torch.float64)
    names = ["trainability", "expressivity", "generalization"]
    rows = []
    for net in (dead, live):
        r = M.compute_metrics(net, x[:8], y[:8], x_test=x[8:], y_test=y[8:], names=names,
                              errors="nan", dtype=torch.float64)  # fmt: skip
        rows.append([r[n] for n in names])
    assert rows[0][0] == pytest.approx(1.0) and math.isnan(rows[0][1]) and math.isnan(rows[0][2])
    assert all(math.isfinite(v) for v in rows[1])
    totals = M.borda(rows, [M.DIRECTIONS[n] for n in names])
    assert totals[0] < totals[1]


def test_errors_nan_keeps_the_metrics_that_are_defined():
    """errors="nan": an InputError of the regression's own inputs (more label classes
    than num_classes, a batch of one to split) made every metric NaN, the kernel metrics
    too (helper-26); only S_e and S_g are NaN now, and a failure of the kernel itself
    still makes all NaN."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.arange(8) % 3
    alone = M.compute_metrics(m, x, y, names="fnorm,lga")
    got = M.compute_metrics(m, x, y, names="fnorm,lga,ntk_score", num_classes=2, errors="nan")
    # (the split's kernel is a block of one call on [x; x_test']: equal up to rounding)
    assert got["fnorm"] == pytest.approx(alone["fnorm"], rel=1e-12)
    assert got["lga"] == pytest.approx(alone["lga"], rel=1e-12)
    assert math.isfinite(got["trainability"])
    assert math.isnan(got["expressivity"]) and math.isnan(got["generalization"])
    with pytest.raises(InputError, match="out of range for num_classes"):
        M.compute_metrics(m, x, y, names="fnorm,ntk_score", num_classes=2)
    one = M.compute_metrics(m, x[:1], y[:1], names="fnorm,ntk_score", errors="nan")
    assert one["fnorm"] == pytest.approx(
        M.compute_metrics(m, x[:1], y[:1], names="fnorm")["fnorm"], rel=1e-12
    )
    assert math.isnan(one["expressivity"]) and math.isnan(one["generalization"])
    bad = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).double()
    with torch.no_grad():
        bad[0].weight.fill_(float("inf"))
    assert all(
        math.isnan(v)
        for v in M.compute_metrics(bad, x, y, names="fnorm,ntk_score", errors="nan").values()
    )


def test_vintk_refuses_token_ids():
    """highpass FFT-filtered integer token ids and cast them back (negative ids): a
    garbage ViNTK score, or an untyped IndexError past errors="nan" (helper-26)."""
    tok = torch.randint(0, 10, (5, 1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="token ids"):
        M.highpass(tok)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(32, 2))
    got = M.compute_metrics(emb, tok, names="fnorm,vintk", errors="nan")
    assert math.isfinite(got["fnorm"]) and math.isnan(got["vintk"])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_kernel_evolution_under_no_grad(mode):
    """NAS scoring code runs under no_grad: kernel_evolution crashed there with autograd's
    errors (ntk and the other metrics did not; helper-26)."""
    model = mlp(3)
    x, y = data(16, 7)
    ref = M.kernel_evolution(model, x, y, times=[1], unit="step", batch_size=8, seed=0)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        got = M.kernel_evolution(model, x.clone(), y, times=[1], unit="step", batch_size=8, seed=0)
    assert got.lga == ref.lga and got.relative_difference == ref.relative_difference


@pytest.mark.parametrize("kw, match", [
    ({"batch_size": 2.5}, "batch_size must be an int"), ({"batch_size": True}, "batch_size must be an int"),
    ({"times": "12"}, "times must be a sequence"), ({"times": [1.7]}, "each of times must be an int"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"), ({"momentum": -1}, "momentum"),
    ({"seed": 2**70}, "seed must be an int"),
])  # fmt: skip
def test_kernel_evolution_options_checked(kw, match):
    model = mlp(3)
    x, y = data(8, 7)
    with pytest.raises(OptionError, match=match):
        M.kernel_evolution(model, x, y, **kw)


def test_kernel_evolution_copies_the_model_outside_other_calls():
    """The copy it trains was made without fastntk's per-module locks, so a copy made
    while another thread's ntk call held the model took that call's temporary modes and
    per-sample BatchNorm forwards (helper-26); it waits for the model's locks now."""
    import threading

    from fastntk import _model

    model = mlp(3)
    x, y = data(16, 7)
    ref = M.kernel_evolution(model, x, y, times=[1], unit="step", batch_size=8, seed=0)
    out = []
    with _model.locked(model):  # as an ntk call on another thread holds it
        t = threading.Thread(
            target=lambda: out.append(
                M.kernel_evolution(model, x, y, times=[1], unit="step", batch_size=8, seed=0)
            )
        )
        t.start()
        t.join(0.5)
        assert t.is_alive() and not out  # waiting for the model
    t.join()
    assert out[0].lga == ref.lga and out[0].relative_difference == ref.relative_difference


def test_token_model_keeps_s_g_when_s_e_is_undefined():
    """Token ids cannot be perturbed, so S_e is undefined for a token model; S_g is not,
    and it was NaN whenever S_e was asked for too (helper-27)."""
    import zoo

    m, x, _ = zoo.make("tied", n=6)
    y = torch.arange(6) % 2
    alone = M.compute_metrics(m, x, y, names="generalization", dtype=torch.float64)
    got = M.compute_metrics(m, x, y, names="ntk_score", errors="nan", dtype=torch.float64)
    assert math.isnan(got["expressivity"]) and math.isfinite(got["trainability"])
    assert got["generalization"] == pytest.approx(alone["generalization"], rel=1e-12)
    with pytest.raises(InputError, match="token ids"):
        M.compute_metrics(m, x, y, names="ntk_score", dtype=torch.float64)
