"""method="sketch": reproducible, unbiased, error shrinking like 1/sqrt(m)."""

from __future__ import annotations

import pytest
import torch

import fastntk
from fastntk import errors

ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|avg_pool_3x3~2|"


def nb201(n=8, C=4):
    from fastntk.spaces.nb201 import build_model

    torch.manual_seed(0)
    m = build_model(ARCH, C=C, N=1)
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return m, x


def rel_fro(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def exact():
    m, x = nb201()
    return m, x, fastntk.ntk(m, x, dtype=torch.float64)


def test_error_at_4096_and_shrinks_with_m(exact):
    m, x, ex = exact
    errs = {}
    for dim in (64, 4096):
        errs[dim] = (
            sum(
                rel_fro(
                    fastntk.ntk(m, x, method="sketch", sketch_dim=dim, seed=s, dtype=torch.float64),
                    ex,
                )
                for s in range(3)
            )
            / 3
        )
    assert errs[4096] <= 0.05
    assert errs[64] > 2 * errs[4096]


@pytest.mark.parametrize("dim", [16, 128])
def test_squared_error_is_the_count_sketchs(dim):
    """E‖S Sᵀ − Θ‖²_F = Σ_ij (Θ_ii Θ_jj + Θ_ij² − 2 Σ_c G_ic² G_jc²) / m, the variance of a
    CountSketch with independent hashes: the error shrinks like 1/√m. A model whose
    gradient coordinates are of one size (no few dominating ones: the mean over seeds
    converges); held to 4 standard errors of the mean over 200 seeds."""
    from reference import jacobian

    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).double()
    x = torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    G = jacobian(m, x, "eval")[:, 0]
    theta = G @ G.T
    d = theta.diagonal()
    expected = float((d[:, None] * d[None, :] + theta**2 - 2 * (G**2) @ (G**2).T).sum()) / dim
    sq = torch.tensor([float(((S @ S.T - theta) ** 2).sum()) for S in (
        fastntk.ntk_sketch(m, x, sketch_dim=dim, seed=s) for s in range(200))], dtype=torch.float64)  # fmt: skip
    se = float(sq.std()) / 200**0.5
    assert abs(float(sq.mean()) - expected) <= 4 * se, (float(sq.mean()), expected, se)


def test_hashes_computed_or_kept_give_one_sketch(exact, monkeypatch):
    """Hashes are drawn per segment of coordinates from (seed, name, pass, segment) and
    kept between chunks while they fit in HASH_BYTES (they were stored for every parameter
    and logit: O(K·P) memory); kept or not, chunked or not, with segments that split
    column blocks, the sketch is the same."""
    from fastntk.engine import sketch

    m, x, _ = exact
    monkeypatch.setattr(sketch, "SEGMENT", 100)  # (blocks of 3 x 7: segments cut them)
    a = fastntk.ntk_sketch(m, x, sketch_dim=64, seed=3, output="trace", dtype=torch.float64)
    monkeypatch.setattr(sketch, "HASH_BYTES", 0)
    b = fastntk.ntk_sketch(m, x, sketch_dim=64, seed=3, output="trace", dtype=torch.float64,
                           chunk_size=(3, 7))  # fmt: skip
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(a.abs().max()))


def test_unbiased_average_of_seeds(exact):
    """The average of 24 sketches is closer than one: unbiased, its error falls like
    1/√24 (about 0.2 of a single sketch's mean error; a bias would keep it up). Compared
    with the mean error of the same 24 (one seed alone can be far luckier than typical)."""
    m, x, ex = exact
    sketches = [fastntk.ntk(m, x, method="sketch", sketch_dim=32, seed=s, dtype=torch.float64)
                for s in range(24)]  # fmt: skip
    single = sum(rel_fro(k, ex) for k in sketches) / len(sketches)
    assert rel_fro(sum(sketches) / len(sketches), ex) < single / 2


def test_reproducible_and_consistent_across_batches(exact):
    m, x, _ = exact
    a = fastntk.ntk_sketch(m, x, sketch_dim=128, seed=7)
    b = fastntk.ntk_sketch(m, x, sketch_dim=128, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, fastntk.ntk_sketch(m, x, sketch_dim=128, seed=8))
    # chunked sketching gives the same rows as one pass (hashes do not depend on blocking)
    c = fastntk.ntk_sketch(m, x, sketch_dim=128, seed=7, chunk_size=(3, 5))
    assert torch.allclose(a, c, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    # cross kernel = S(x1) S(x2)^T with the same hashes
    cross = fastntk.ntk(m, x[:3], x[3:], method="sketch", sketch_dim=128, seed=7)
    assert torch.allclose(cross, a[:3] @ a[3:].T, rtol=1e-4, atol=1e-4 * cross.abs().max().item())


def test_trace_sketch_close(exact):
    m, x, _ = exact
    ex = fastntk.ntk(m, x, output="trace", dtype=torch.float64)
    sk = fastntk.ntk(m, x, output="trace", method="sketch", sketch_dim=4096, dtype=torch.float64)
    assert rel_fro(sk, ex) <= 0.05


def test_sketch_errors(exact):
    m, x, _ = exact
    with pytest.raises(errors.OptionError, match="sketch_dim"):
        fastntk.ntk_sketch(m, x, sketch_dim=0)
    with pytest.raises(errors.OptionError, match="scalar kernels"):
        fastntk.ntk_sketch(m, x, output="full")
    with pytest.raises(errors.OptionError, match="couples samples"):
        fastntk.ntk_sketch(m, x, bn="batch")
    for bad in (True, 2.0, -3, "8"):
        with pytest.raises(errors.OptionError, match="sketch_dim"):
            fastntk.ntk_sketch(m, x, sketch_dim=bad)
        with pytest.raises(errors.OptionError, match="sketch_dim"):
            fastntk.ntk(m, x, sketch_dim=bad)  # (checked whatever the method)
    with pytest.raises(errors.OptionError, match="does not fit"):
        fastntk.ntk_sketch(m, x, sketch_dim=10**12)
    with pytest.raises(errors.OptionError, match="does not fit"):
        fastntk.ntk_sketch(m, x, sketch_dim=2**62)
    import numpy as np

    assert torch.equal(fastntk.ntk_sketch(m, x, sketch_dim=np.int64(8)),
                       fastntk.ntk_sketch(m, x, sketch_dim=8))  # fmt: skip
    for bad in (1.5, None, "0", True):
        with pytest.raises(errors.OptionError, match="seed must be an int"):
            fastntk.ntk_sketch(m, x, sketch_dim=8, seed=bad)
    for bad in ("float64", torch.int64, torch.complex64):
        with pytest.raises(errors.OptionError, match="dtype must be"):
            fastntk.ntk_sketch(m, x, sketch_dim=8, dtype=bad)
        with pytest.raises(errors.OptionError, match="dtype must be"):
            fastntk.ntk(m, x, dtype=bad)
        with pytest.raises(errors.OptionError, match="dtype must be"):
            fastntk.explain(m, x, dtype=bad)


def test_every_seed_its_own_sketch(exact):
    """Seeds were mixed into 47 bits: 0 and 2**47 gave the same sketch."""
    import numpy as np

    m, x, _ = exact
    S = {s: fastntk.ntk_sketch(m, x[:3], sketch_dim=16, seed=s) for s in (0, 2**47, -1, 2**47 - 1)}
    assert not torch.equal(S[0], S[2**47]) and not torch.equal(S[-1], S[2**47 - 1])
    assert torch.equal(fastntk.ntk_sketch(m, x[:3], sketch_dim=16, seed=np.int64(2**47)), S[2**47])
