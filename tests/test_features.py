"""feature_entropy (AZ-NAS's expressivity): against a direct float64 computation, in every
BatchNorm mode, with the model unchanged; its errors; its use by compute_metrics and the
search spaces' scorers."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_state_and_errors import assert_same, snapshot

from fastntk import metrics as M
from fastntk.errors import InputError, InputTypeError, OptionError
from fastntk.search.scoring import space_scorer
from fastntk.spaces import nb201


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    ).double()


def batch(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64)


BLOCKS = ("1", "4", "7")  # BatchNorm (N, 6, 6, 6), ReLU (N, 5, 3, 3), Linear (N, 4)


def entropy(f: np.ndarray, channel_dim: int) -> float:
    """The spectrum's entropy written out: rows = every index but the batch and channel."""
    rows = np.moveaxis(f, channel_dim, -1).reshape(-1, f.shape[channel_dim])
    rows = rows - rows.mean(axis=0)
    lam = np.clip(np.linalg.eigvalsh(rows.T @ rows / rows.shape[0]), 0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def outputs(model, x, names):
    """Each named submodule's output of a plain forward."""
    got = {}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach()))
          for n in names]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return [got[n].numpy() for n in names]


def oracle(model, x, bn):
    m = copy.deepcopy(model)
    if bn == "eval":
        return [entropy(f, 1) for f in outputs(m.eval(), x, BLOCKS)]
    if bn == "batch":
        return [entropy(f, 1) for f in outputs(m.train(), x, BLOCKS)]
    # per_sample: each sample normalised by its own statistics = a train-mode batch of one
    each = [outputs(copy.deepcopy(model).train(), x[i : i + 1], BLOCKS) for i in range(len(x))]
    return [entropy(np.concatenate([e[b] for e in each]), 1) for b in range(len(BLOCKS))]


@pytest.mark.parametrize("bn", ["eval", "batch", "per_sample"])
def test_block_entropies_match_direct_computation(bn):
    model, x = net(), batch()
    with torch.no_grad():  # running statistics apart from the defaults, as after training
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    before = snapshot(model)
    got = M.block_entropies(model, x, list(BLOCKS), bn=bn)
    assert_same(before, snapshot(model))  # running statistics too, under bn="batch"
    want = oracle(model, x, bn)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert M.feature_entropy(model, x, list(BLOCKS), bn=bn) == pytest.approx(sum(want), rel=1e-10)
    # the modes differ (else the test above would not tell them apart)
    if bn != "eval":
        assert abs(got[0] - oracle(model, x, "eval")[0]) > 1e-3


def test_blocks_by_module_and_channel_last():
    model, x = net(), batch()
    by_name = M.block_entropies(model, x, ["1"], bn="eval")
    by_module = M.block_entropies(model, x, [model[1]], bn="eval")
    assert by_name == by_module
    # a (N, tokens, D) output read with channel_dim=-1 equals its (N, D, tokens) transpose
    tokens = nn.Sequential(nn.Linear(5, 6), nn.Tanh()).double()
    xt = torch.randn(4, 9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    last = M.block_entropies(tokens, xt, ["1"], channel_dim=-1)
    want = entropy(outputs(tokens, xt, ["1"])[0].transpose(0, 2, 1), 1)
    assert last == pytest.approx([want], rel=1e-10)


def test_dtype_of_the_forward():
    m32, x32 = net().float(), batch().float()
    want = M.block_entropies(copy.deepcopy(m32).double(), x32.double(), list(BLOCKS))
    got = M.block_entropies(m32, x32, list(BLOCKS), dtype=torch.float64)
    assert got == pytest.approx(want, rel=1e-12)  # float64 copies of the float32 weights
    assert next(m32.parameters()).dtype == torch.float32  # the model's own: unchanged
    own = M.block_entropies(m32, x32, list(BLOCKS))  # the parameters' dtype: float32
    assert own == pytest.approx(want, rel=1e-4) and own != got
    with pytest.raises(OptionError, match="floating-point"):
        M.block_entropies(m32, x32, list(BLOCKS), dtype=torch.int64)


def test_entropy_bounds_and_invariances():
    model, x = net(), batch(n=9)
    e = M.block_entropies(model, x, list(BLOCKS))
    assert all(0 < v <= math.log(c) + 1e-12 for v, c in zip(e, (6, 5, 4), strict=True))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    assert M.block_entropies(model, x[perm], list(BLOCKS)) == pytest.approx(e, rel=1e-10)


def test_constant_block_is_undefined():
    model, x = net(), batch()
    with torch.no_grad():
        model[3].weight.zero_()
        model[3].bias.fill_(0.3)  # the second conv's output is the same everywhere
    e = M.block_entropies(model, x, list(BLOCKS))
    assert not math.isnan(e[0]) and math.isnan(e[1]) and math.isnan(e[2])
    assert math.isnan(M.feature_entropy(model, x, list(BLOCKS)))


def test_errors_and_model_unchanged_when_raising():
    model, x = net(), batch()
    before = snapshot(model)
    with pytest.raises(OptionError, match="no submodule named 'nine'"):
        M.feature_entropy(model, x, ["nine"])
    with pytest.raises(OptionError, match="not a submodule"):
        M.feature_entropy(model, x, [nn.ReLU()])
    with pytest.raises(OptionError, match="list of the model's submodules"):
        M.feature_entropy(model, x, "1")
    with pytest.raises(OptionError, match="empty"):
        M.feature_entropy(model, x, [])
    with pytest.raises(OptionError, match="batch dimension"):
        M.feature_entropy(model, x, ["1"], channel_dim=0)
    with pytest.raises(OptionError, match="bn must be one of"):
        M.feature_entropy(model, x, ["1"], bn="train")
    with pytest.raises(InputTypeError, match="nn.Module"):
        M.feature_entropy(lambda t: t, x, ["1"])

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return x, self.inner(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.unused = Pair(), nn.Linear(3, 3)

        def forward(self, x):
            return self.pair(x)[1]

    outer = Outer().double()
    xs = torch.randn(4, 3, dtype=torch.float64)
    before_outer = snapshot(outer)
    with pytest.raises(InputTypeError, match="returned tuple, not a tensor"):
        M.feature_entropy(outer, xs, ["pair"])
    with pytest.raises(InputError, match=r"blocks \[0\] did not run"):
        M.feature_entropy(outer, xs, ["unused"])
    assert_same(before_outer, snapshot(outer))  # the hooks are gone after the errors
    assert_same(before, snapshot(model))


def test_compute_metrics_needs_blocks_and_combines():
    model, x = net(), batch()
    y = torch.arange(7) % 4
    with pytest.raises(OptionError, match="needs blocks="):
        M.compute_metrics(model, x, y, "feature_entropy,ncn")
    got = M.compute_metrics(model, x, y, "ncn,feature_entropy,num_params", blocks=list(BLOCKS),
                            bn="per_sample")  # fmt: skip
    assert list(got) == ["ncn", "feature_entropy", "num_params"]
    assert got["feature_entropy"] == pytest.approx(sum(oracle(model, x, "per_sample")), rel=1e-10)
    assert got["ncn"] == M.compute_metrics(model, x, y, "ncn", bn="per_sample")["ncn"]
    # the operator path leaves it to the same function (it needs no kernel)
    op = M.compute_metrics(model, x, y, "lga,feature_entropy", blocks=list(BLOCKS),
                           bn="per_sample", path="operator")  # fmt: skip
    assert op["feature_entropy"] == got["feature_entropy"]
    assert M.DIRECTIONS["feature_entropy"] is True


def test_spaces_give_their_blocks():
    space = nb201.NB201Space(C=4, N=1)
    scorer = space_scorer(space, "feature_entropy,num_params", data="synthetic", batch_size=6)
    arch = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|"
    got = scorer.fn(arch)
    from fastntk.search.scoring import arch_seed

    torch.manual_seed(arch_seed(0, space.encode(arch)))
    model = space.build(arch)
    blocks, channel_dim = space.feature_blocks(model)
    assert len(blocks) == 1 + 3 * 1 + 2  # the stem, N=1 cells a stage, two reductions
    want = M.feature_entropy(model, scorer.fn.x, blocks, channel_dim=channel_dim,
                             bn=M.NAS["bn"])  # fmt: skip
    assert got["feature_entropy"] == want

    class Bare:
        name = "bare"

    with pytest.raises(OptionError, match="feature_blocks"):
        space_scorer(Bare(), "feature_entropy", data="synthetic")
    with pytest.raises(OptionError, match="without them"):  # the default score has them
        space_scorer(Bare(), data="synthetic")


@pytest.mark.parametrize("name", ["darts", "vit", "resnet"])
def test_other_spaces_blocks_run(name):
    from fastntk.spaces.registry import get_space

    space = get_space(name)
    rng = __import__("random").Random(0)
    arch = space.sample(rng)
    model = space.build(arch).eval()
    blocks, channel_dim = space.feature_blocks(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    e = M.block_entropies(model, x, blocks, channel_dim=channel_dim)
    assert len(e) == len(blocks) and all(v > 0 for v in e)
