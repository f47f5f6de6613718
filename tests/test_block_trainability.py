"""block_trainability (AZ-NAS's trainability): against a direct float64 computation from
each block's full Jacobian, in every BatchNorm mode, with the model unchanged; its edge
cases and errors; its use by compute_metrics and the search spaces' scorers."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_state_and_errors import assert_same, snapshot

from fastntk import metrics as M
from fastntk.errors import InputError, NonFiniteKernelError, OptionError
from fastntk.search.scoring import arch_seed, space_scorer
from fastntk.spaces import nb201


def net():
    """Three consecutive blocks: (N, 6, 6, 6) -> strided (N, 5, 3, 3) -> (N, 5, 3, 3)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)),
        nn.Sequential(nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5)),
        nn.Sequential(nn.ReLU(), nn.Conv2d(5, 5, 1)),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)),
    ).double()


BLOCKS = ["0", "1", "2"]


def batch(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64)


def block_fn(block, bn):
    """The block as a function of its input batch, in BatchNorm mode ``bn``."""
    if bn == "eval":
        return lambda t: copy.deepcopy(block).eval()(t)
    if bn == "batch":
        return lambda t: copy.deepcopy(block).train()(t)
    # per-sample: each sample normalised by its own statistics, a train-mode batch of one
    return lambda t: torch.cat([copy.deepcopy(block).train()(t[i : i + 1]) for i in range(len(t))])


def oracle(model, x, bn, seed=0):
    """The score written out: the full Jacobian of each block at its input, the same
    Rademacher draws (one generator, blocks in order), rows regrouped by hand."""
    g = torch.Generator().manual_seed(seed)
    f = block_fn(model[0], bn)(x).detach()
    scores = []
    for name in BLOCKS[1:]:
        fn = block_fn(model[int(name)], bn)
        out = fn(f).detach()
        jac = torch.autograd.functional.jacobian(fn, f)  # (*out.shape, *f.shape)
        v = torch.randint(0, 2, out.shape, generator=g).to(out.dtype) * 2 - 1
        u = torch.tensordot(v, jac, dims=out.dim()).numpy()  # vᵀ J, f's shape
        n, c, h, w = u.shape
        s = h // out.shape[2]
        # pixel-unshuffle by hand: input channel c at offset (a, b) of an s x s patch
        u = u.reshape(n, c, h // s, s, w // s, s).transpose(0, 1, 3, 5, 2, 4)
        u = u.reshape(n, c * s * s, h // s, w // s)
        uu = np.moveaxis(u, 1, -1).reshape(-1, c * s * s)
        vv = np.moveaxis(v.numpy(), 1, -1).reshape(-1, out.shape[1])
        sigma = np.linalg.svd(uu.T @ vv / vv.shape[0], compute_uv=False).max()
        scores.append(-sigma - 1 / sigma + 2)
        f = out
    return float(np.mean(scores))


@pytest.mark.parametrize("bn", ["eval", "batch", "per_sample"])
def test_matches_direct_computation(bn):
    model, x = net(), batch()
    with torch.no_grad():  # running statistics apart from the defaults, as after training
        for bn_mod in (model[0][1], model[1][2]):
            bn_mod.running_mean.uniform_(-0.5, 0.5)
            bn_mod.running_var.uniform_(0.5, 2.0)
    before = snapshot(model)
    got = M.block_trainability(model, x, BLOCKS, bn=bn)
    assert_same(before, snapshot(model))
    assert got == pytest.approx(oracle(model, x, bn), rel=1e-10, abs=1e-12)
    assert got < 0  # at most 0, reached only when every σ is exactly 1
    if bn != "eval":  # the modes differ (else the test would not tell them apart)
        assert abs(got - oracle(model, x, "eval")) > 1e-3


def test_seed_and_dtype():
    model, x = net(), batch()
    a = M.block_trainability(model, x, BLOCKS, seed=3)
    assert a == M.block_trainability(model, x, BLOCKS, seed=3)
    assert a != M.block_trainability(model, x, BLOCKS, seed=4)
    assert a == pytest.approx(oracle(model, x, "eval", seed=3), rel=1e-10)
    m32 = copy.deepcopy(model).float()
    got = M.block_trainability(m32, x.float(), BLOCKS, seed=3)  # the parameters' float32
    assert got == pytest.approx(a, rel=1e-4) and got != a
    assert M.block_trainability(m32, x.float(), BLOCKS, seed=3, dtype=torch.float64) == (
        pytest.approx(a, rel=1e-12)
    )
    assert next(m32.parameters()).dtype == torch.float32


def test_channel_last_tokens():
    """(N, tokens, D) blocks: rows are samples × tokens; the same as the transposed maps."""
    torch.manual_seed(0)
    tokens = nn.Sequential(nn.Linear(5, 6), nn.Sequential(nn.Tanh(), nn.Linear(6, 4))).double()
    xt = torch.randn(3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = M.block_trainability(tokens, xt, ["0", "1"], channel_dim=-1)
    f = tokens[0](xt).detach()
    out = tokens[1](f).detach()
    jac = torch.autograd.functional.jacobian(tokens[1], f)
    v = torch.randint(0, 2, out.shape, generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    u = torch.tensordot(v, jac, dims=3).reshape(-1, 6)
    sigma = torch.linalg.matrix_norm(u.T @ v.reshape(-1, 4) / 21, ord=2).item()
    assert got == pytest.approx(-sigma - 1 / sigma + 2, rel=1e-10)


def test_identity_and_dead_blocks_score_worst():
    model, x = net(), batch()
    with_identity = nn.Sequential(*model[:2], nn.Identity(), *model[2:])
    assert M.block_trainability(with_identity, x, ["0", "1", "2"]) == -math.inf
    with torch.no_grad():
        model[2][1].weight.zero_()  # the last block's output ignores its input: σ = 0
    assert M.block_trainability(model, x, BLOCKS) == -math.inf
    assert math.isfinite(M.block_trainability(model, x, BLOCKS[:2]))


def test_errors_and_model_unchanged_when_raising():
    model, x = net(), batch()
    before = snapshot(model)
    with pytest.raises(OptionError, match="at least two blocks"):
        M.block_trainability(model, x, ["0"])
    with pytest.raises(OptionError, match="seed"):
        M.block_trainability(model, x, BLOCKS, seed=0.5)
    with pytest.raises(InputError, match="no position-wise correspondence"):
        M.block_trainability(model, x, ["2", "3"])  # (N, 5, 3, 3) -> (N, 4)

    class Parallel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, t):
            return self.a(t) + self.b(t)

    par = Parallel().double()
    before_par = snapshot(par)
    with pytest.raises(InputError, match="consecutive"):
        M.block_trainability(par, x, ["a", "b"])
    assert_same(before_par, snapshot(par))
    assert_same(before, snapshot(model))


def test_compute_metrics_and_scorer():
    model, x = net(), batch()
    y = torch.arange(5) % 4
    got = M.compute_metrics(model, x, y, "block_trainability,feature_entropy", blocks=BLOCKS,
                            bn="batch", seed=2)  # fmt: skip
    assert got["block_trainability"] == pytest.approx(oracle(model, x, "batch", seed=2), rel=1e-10)
    op = M.compute_metrics(model, x, y, "lga,block_trainability", blocks=BLOCKS, bn="batch",
                           seed=2, path="operator")  # fmt: skip
    assert op["block_trainability"] == got["block_trainability"]
    under_nan = M.compute_metrics(model, x, y, "block_trainability", blocks=["2", "3"],
                                  errors="nan")  # fmt: skip
    assert math.isnan(under_nan["block_trainability"])
    # one forward for both; when one fails the other keeps its value
    both = M.compute_metrics(model, x, y, "feature_entropy,block_trainability",
                             blocks=["2", "3"], errors="nan")  # fmt: skip
    assert math.isnan(both["block_trainability"])
    assert both["feature_entropy"] == M.feature_entropy(model, x, ["2", "3"])
    joint = M.feature_metrics(model, x, BLOCKS, ["block_trainability", "feature_entropy"])
    assert joint == {"block_trainability": M.block_trainability(model, x, BLOCKS),
                     "feature_entropy": M.feature_entropy(model, x, BLOCKS)}  # fmt: skip
    with pytest.raises(OptionError, match="unknown feature metrics"):
        M.feature_metrics(model, x, BLOCKS, ["ncn"])
    assert M.DIRECTIONS["block_trainability"] is True

    space = nb201.NB201Space(C=4, N=1)
    scorer = space_scorer(space, "block_trainability", data="synthetic", batch_size=6)
    arch = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|"
    torch.manual_seed(arch_seed(0, space.encode(arch)))
    built = space.build(arch)
    blocks, channel_dim = space.feature_blocks(built)
    want = M.block_trainability(built, scorer.fn.x, blocks, channel_dim=channel_dim,
                                bn=M.NAS["bn"])  # fmt: skip
    assert scorer.fn(arch)["block_trainability"] == want and math.isfinite(want)


@pytest.mark.parametrize("name", ["darts", "vit", "resnet"])
def test_other_spaces_blocks_run(name):
    from fastntk.spaces.registry import get_space

    space = get_space(name)
    arch = space.sample(__import__("random").Random(0))
    model = space.build(arch)
    blocks, channel_dim = space.feature_blocks(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert M.block_trainability(model, x, blocks, channel_dim=channel_dim) <= 0


def test_feature_metrics_survive_a_kernel_that_fails():
    """errors="nan": a kernel that overflows makes the kernel metrics NaN, not the metrics
    that need no kernel (the block features, the parameter count)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Flatten(), nn.Linear(4 * 36, 3))  # fmt: skip
    with torch.no_grad():
        model[4].weight.mul_(1e25)  # finite outputs in float32, gradients squared overflow
    x, y = batch(n=6, seed=2).float(), torch.arange(6) % 3
    names = "lga,feature_entropy,block_trainability,num_params"
    with pytest.raises(NonFiniteKernelError):
        M.compute_metrics(model, x, y, names, blocks=["0", "2"])
    got = M.compute_metrics(model, x, y, names, blocks=["0", "2"], errors="nan")
    assert math.isnan(got["lga"])
    assert got["num_params"] == sum(p.numel() for p in model.parameters())
    assert got["feature_entropy"] == M.feature_entropy(model, x, ["0", "2"]) > 0
    assert got["block_trainability"] == M.block_trainability(model, x, ["0", "2"]) > -math.inf
