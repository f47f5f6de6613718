"""Tests of the NAS-Bench-201 search space (fastntk.spaces.nb201)."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict

import pytest
import torch

from fastntk.errors import ArchitectureError, OptionError
from fastntk.spaces import base
from fastntk.spaces import nb201 as m

ALL_CONV3 = (
    "|nor_conv_3x3~0|+"
    "|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
)
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
BRIEF_ARCH = (
    "|nor_conv_3x3~0|+"
    "|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|avg_pool_3x3~2|"
)
BEST_C10 = (
    "|nor_conv_3x3~0|+"
    "|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
)
FIRST_ROW = (
    "|avg_pool_3x3~0|+"
    "|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|"
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- strings


def test_all_archs_order_and_roundtrip():
    archs = m.all_archs()
    assert len(archs) == 15625 == m.NUM_ARCHS
    assert len(set(archs)) == 15625
    assert archs[0] == FIRST_ROW  # benchmark index order, not enumeration order
    enumerated = {m.format_arch(ops) for ops in itertools.product(m.OPS, repeat=6)}
    assert set(archs) == enumerated
    for a in archs:
        ops = m.parse_arch(a)
        assert len(ops) == 6
        assert m.format_arch(ops) == a
        assert m.validate_arch(a) == a


def test_parse_edge_order():
    s = "|skip_connect~0|+|nor_conv_1x1~0|nor_conv_3x3~1|+|avg_pool_3x3~0|none~1|skip_connect~2|"
    assert m.parse_arch(s) == (
        "skip_connect",  # 1 <- 0
        "nor_conv_1x1",  # 2 <- 0
        "nor_conv_3x3",  # 2 <- 1
        "avg_pool_3x3",  # 3 <- 0
        "none",  # 3 <- 1
        "skip_connect",  # 3 <- 2
    )


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("", "empty"),
        ("|conv_5x5~0|+|none~0|none~1|+|none~0|none~1|none~2|", "unknown op 'conv_5x5'"),
        ("|none~0|+|none~0|none~1|", "3 node groups"),
        ("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|+|none~0|", "3 node groups"),
        ("|none~0|+|none~0|+|none~0|none~1|none~2|", "node 2 must have exactly 2"),
        ("|none~0|+|none~0|none~1|+|none~0|none~1|", "node 3 must have exactly 3"),
        ("|none~0|+|none~1|none~0|+|none~0|none~1|none~2|", "must come from node 0"),
        ("|none~0|+|none~0|none~1|+|none~0|none~1|none~3|", "must come from node 2"),
        ("|none~0|+|none~0|none~x|+|none~0|none~1|none~2|", "node index"),
        ("|none|+|none~0|none~1|+|none~0|none~1|none~2|", "op~source"),
        ("none~0|+|none~0|none~1|+|none~0|none~1|none~2|", "start and end with '|'"),
        ("|none~0|+|none~0|none~1|+|none~0|none~1|none~2", "start and end with '|'"),
        (" |none~0|+|none~0|none~1|+|none~0|none~1|none~2|", "whitespace"),
        (42, "must be a str"),
    ],
)
def test_malformed_arch_strings(bad, needle):
    with pytest.raises(ArchitectureError) as info:
        m.validate_arch(bad)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_op_message_lists_allowed_ops():
    with pytest.raises(ArchitectureError) as info:
        m.parse_arch("|max_pool_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|")
    for op in m.OPS:
        assert op in str(info.value)
    with pytest.raises(ArchitectureError):
        m.format_arch(("none",) * 5)
    with pytest.raises(ArchitectureError):
        m.format_arch(("none",) * 5 + ("conv",))


# --------------------------------------------------------------------------- isomorphism


def test_isomorphism_matches_unique_string_column():
    table = m.load_table()
    assert len(set(table.unique)) == 6466
    canon = [m.canonical(a) for a in table.archs]
    assert len(set(canon)) == 6466 == m.NUM_UNIQUE
    # unique_str reproduces the table column exactly
    assert all(m.unique_str(a) == u for a, u in zip(table.archs, table.unique, strict=True))
    # same UniqueString <=> same canonical form (a bijection between the two partitions)
    by_unique: dict[str, set[str]] = defaultdict(set)
    by_canon: dict[str, set[str]] = defaultdict(set)
    for u, c in zip(table.unique, canon, strict=True):
        by_unique[u].add(c)
        by_canon[c].add(u)
    assert all(len(v) == 1 for v in by_unique.values())
    assert all(len(v) == 1 for v in by_canon.values())
    # the representative is a member of its own class and is a fixed point
    for c in set(canon):
        assert m.canonical(c) == c
        assert m.unique_str(c) == table.unique[table.index[c]]


def test_canonical_examples():
    # skip chains collapse: 1<-0 skip then 2<-1 conv == 2<-0 conv on a node-2 path
    a = "|skip_connect~0|+|none~0|nor_conv_3x3~1|+|none~0|none~1|skip_connect~2|"
    b = "|none~0|+|nor_conv_3x3~0|none~1|+|none~0|none~1|skip_connect~2|"
    assert m.canonical(a) == m.canonical(b)
    assert m.unique_str(a) == "#+#+#+(0)@nor_conv_3x3"
    # a conv fed only by a zero node is dead
    c = "|none~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|none~0|none~1|skip_connect~2|"
    assert m.canonical(c) == m.canonical(b)
    # different ops are not isomorphic
    assert m.canonical(ALL_CONV3) != m.canonical(BRIEF_ARCH)
    assert m.canonical(tuple(m.parse_arch(BRIEF_ARCH))) == m.canonical(BRIEF_ARCH)


# --------------------------------------------------------------------------- table


def test_table_accuracy_rank_percentile():
    table = m.load_table()
    assert m.load_table() is table  # cached
    assert len(table) == 15625
    assert max(table.acc["cifar10"]) == pytest.approx(94.37, abs=0.01)
    assert max(table.acc["cifar100"]) == pytest.approx(73.51, abs=0.01)
    assert max(table.acc["imagenet16-120"]) == pytest.approx(47.31, abs=0.01)
    best = table.archs[int(table.acc["cifar10"].argmax())]
    assert best == BEST_C10
    assert m.accuracy(best) == pytest.approx(94.3733, abs=1e-3)
    assert m.rank(best, "cifar10") == 1
    assert 99.98 < m.percentile(best, "cifar10") < 100.0
    assert m.accuracy(FIRST_ROW, "cifar100") == pytest.approx(52.9133, abs=1e-3)
    assert m.accuracy(FIRST_ROW, "ImageNet16-120") == pytest.approx(26.6333, abs=1e-3)
    rec = table.record(FIRST_ROW)
    assert rec["index"] == 0 and rec["cifar10"] == pytest.approx(85.8633, abs=1e-3)
    worst = table.archs[int(table.acc["cifar10"].argmin())]
    assert m.percentile(worst) == 0.0
    assert m.rank(worst) > 15000
    # rank and percentile are consistent with a direct count
    acc = table.acc["cifar100"]
    a = BRIEF_ARCH
    x = m.accuracy(a, "cifar100")
    assert m.rank(a, "cifar100") == 1 + int((acc > x).sum())
    assert m.percentile(a, "cifar100") == pytest.approx(100.0 * (acc < x).sum() / 15625)
    # percentiles: the same counts for many archs at once, in the order given
    some = [table.archs[i] for i in (7, 15624, 0, 7)] + [BRIEF_ARCH]
    for d in m.DATASETS:
        want = [100.0 * (table.acc[d] < m.accuracy(s, d)).sum() / 15625 for s in some]
        assert m.percentiles(some, d).tolist() == pytest.approx(want, abs=0)
        assert m.accuracies(some, d).tolist() == [m.accuracy(s, d) for s in some]


def test_unknown_dataset_and_arch():
    with pytest.raises(OptionError, match="cifar10, cifar100, imagenet16-120"):
        m.accuracy(BEST_C10, "svhn")
    with pytest.raises(OptionError):
        m.rank(BEST_C10, "mnist")
    with pytest.raises(ArchitectureError):
        m.accuracy("|nor_conv_3x3~0|", "cifar10")


# --------------------------------------------------------------------------- model


def test_param_counts():
    assert n_params(m.build_model(ALL_CONV3)) == 1_531_546
    assert n_params(m.build_model(ALL_NONE)) == 73_306
    assert n_params(m.build_model(BRIEF_ARCH)) == 830_426
    assert n_params(m.build_model(ALL_NONE, num_classes=100)) == 73_306 + 90 * 65


def test_forward_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for a in (BRIEF_ARCH, ALL_NONE):
        net = m.build_model(a)
        feats, logits = net(x)
        assert feats.shape == (2, 64)
        assert logits.shape == (2, 10)
        assert torch.isfinite(logits).all()
    net = m.build_model(BRIEF_ARCH, num_classes=100, C=8, N=1).eval()
    feats, logits = net(x)
    assert feats.shape == (2, 32) and logits.shape == (2, 100)


def _expected_state(ops, C=16, N=5, num_classes=10):
    """Independent key -> shape list of the official TinyNetwork (brief section 6)."""
    keys = {}

    def bn(prefix, c):
        keys[prefix + ".weight"] = (c,)
        keys[prefix + ".bias"] = (c,)
        keys[prefix + ".running_mean"] = (c,)
        keys[prefix + ".running_var"] = (c,)
        keys[prefix + ".num_batches_tracked"] = ()

    def rcb(prefix, cin, cout, k):
        keys[prefix + ".op.1.weight"] = (cout, cin, k, k)
        bn(prefix + ".op.2", cout)

    keys["stem.0.weight"] = (C, 3, 3, 3)
    bn("stem.1", C)
    i = 0
    for stage in range(3):
        c = C * 2**stage
        if stage > 0:
            p = f"cells.{i}"
            rcb(p + ".conv_a", c // 2, c, 3)
            rcb(p + ".conv_b", c, c, 3)
            keys[p + ".downsample.1.weight"] = (c, c // 2, 1, 1)
            i += 1
        for _ in range(N):
            for e, op in enumerate(ops):
                p = f"cells.{i}.layers.{e}"
                if op == "nor_conv_1x1":
                    rcb(p, c, c, 1)
                elif op == "nor_conv_3x3":
                    rcb(p, c, c, 3)
            i += 1
    bn("lastact.0", 4 * C)
    keys["classifier.weight"] = (num_classes, 4 * C)
    keys["classifier.bias"] = (num_classes,)
    return keys


@pytest.mark.parametrize("arch", [BRIEF_ARCH, ALL_NONE, FIRST_ROW])
def test_state_dict_matches_official_layout(arch):
    net = m.build_model(arch)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == _expected_state(m.parse_arch(arch))
    assert len(net.cells) == 3 * 5 + 2
    assert isinstance(net.cells[5].downsample[0], torch.nn.AvgPool2d)


def test_state_dict_representative_keys_and_strict_load():
    net = m.build_model(ALL_CONV3)
    sd = net.state_dict()
    for key in (
        "stem.0.weight",
        "cells.0.layers.0.op.1.weight",
        "cells.0.layers.5.op.2.running_var",
        "cells.5.conv_a.op.1.weight",
        "cells.5.conv_b.op.2.bias",
        "cells.5.downsample.1.weight",
        "cells.16.layers.2.op.1.weight",
        "lastact.0.running_mean",
        "classifier.weight",
    ):
        assert key in sd
    assert sd["cells.5.conv_a.op.1.weight"].shape == (32, 16, 3, 3)
    assert sd["cells.11.downsample.1.weight"].shape == (64, 32, 1, 1)
    other = m.build_model(ALL_CONV3)
    other.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    other.eval()
    assert torch.equal(net(x)[1], other(x)[1])


def test_model_structure_and_no_inplace():
    net = m.build_model(BRIEF_ARCH, C=4, N=1)
    cell = net.cells[0]
    assert len(cell.layers) == 6
    assert isinstance(cell.layers[0].op, torch.nn.Sequential)
    assert isinstance(cell.layers[5].op, torch.nn.AvgPool2d)
    assert cell.layers[5].op.count_include_pad is False
    assert list(cell.layers[3].parameters()) == []  # skip_connect
    assert list(m.build_model(ALL_NONE, C=4, N=1).cells[0].layers[0].parameters()) == []
    for mod in net.modules():
        assert not getattr(mod, "inplace", False)


def test_vmap_functional_call_with_zero_op():
    from torch.func import functional_call, vmap

    arch = "|none~0|+|avg_pool_3x3~0|skip_connect~1|+|nor_conv_1x1~0|none~1|nor_conv_3x3~2|"
    net = m.build_model(arch, C=4, N=1).eval()
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    x = torch.randn(3, 3, 16, 16)

    def f(p, xi):
        return functional_call(net, (p, buffers), (xi[None],))[1][0]

    out = vmap(f, in_dims=(None, 0))(params, x)
    torch.testing.assert_close(out, net(x)[1], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- space


def test_space_protocol_sample_mutate():
    space = m.NB201Space()
    assert isinstance(space, base.SearchSpace)
    assert space.name == "nb201"
    s1 = [space.sample(random.Random(123)) for _ in range(3)]
    assert len(set(s1)) == 1  # same seed, same draw
    r1, r2 = random.Random(7), random.Random(7)
    draws = [space.sample(r1) for _ in range(50)]
    assert draws == [space.sample(r2) for _ in range(50)]
    assert len(set(draws)) > 40
    valid = set(m.all_archs())
    rng = random.Random(0)
    for a in draws:
        assert a in valid
        b = space.mutate(a, rng)
        assert b in valid
        diff = [x != y for x, y in zip(m.parse_arch(a), m.parse_arch(b), strict=True)]
        assert sum(diff) == 1
    assert space.encode(BRIEF_ARCH) == BRIEF_ARCH
    assert space.decode(BRIEF_ARCH) == BRIEF_ARCH
    with pytest.raises(ArchitectureError):
        space.decode("|nor_conv_3x3~0|+")
    assert space.canonical(BRIEF_ARCH) == m.canonical(BRIEF_ARCH)
    assert space.accuracy(BEST_C10) == m.accuracy(BEST_C10)
    net = m.NB201Space(C=4, N=1).build(ALL_NONE, num_classes=3)
    assert net.classifier.out_features == 3


def test_sample_is_roughly_uniform_over_ops():
    space = m.NB201Space()
    rng = random.Random(1)
    counts = defaultdict(int)
    for _ in range(2000):
        for op in m.parse_arch(space.sample(rng)):
            counts[op] += 1
    assert set(counts) == set(m.OPS)
    assert all(abs(c / 12000 - 0.2) < 0.03 for c in counts.values())


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (3, 4, 8, 5), (1, 2, 1, 1), (2, 2, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_avg_pool3x3_is_official_avg_pool(stride, shape, dtype):
    """The box-filter pool equals AvgPool2d(3, stride, 1, count_include_pad=False)."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    ours = m.AvgPool3x3(stride)
    ref = torch.nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    a, b = ours(x), ref(x)
    g = torch.randn_like(a)
    (ga,) = torch.autograd.grad(a, x, g)
    (gb,) = torch.autograd.grad(b, x, g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert a.shape == b.shape and (a - b).abs().max() <= tol
    assert (ga - gb).abs().max() <= tol
    assert isinstance(ours, torch.nn.AvgPool2d) and not list(ours.parameters())
    # unbatched input goes to the built-in op
    assert torch.allclose(ours(x[0]), ref(x[0]))


def test_pooling_op_uses_box_filter_pool():
    net = m.build_model(
        "|avg_pool_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|none~0|none~1|skip_connect~2|", C=4, N=1
    )
    pools = [mod for mod in net.modules() if isinstance(mod, m.Pooling)]
    assert pools and all(isinstance(p.op, m.AvgPool3x3) for p in pools)


def test_supernet_edges_average_their_ops_and_share_weights_by_name():
    """TE-NAS weights the live ops of an edge by softmax(α) with α = 0: their mean (the
    sum was used before); ops are kept by name, so a pruned supernet loads its weights
    from the full one."""
    import torch

    from fastntk.spaces import nb201

    torch.manual_seed(0)
    two = ("nor_conv_3x3", "skip_connect")
    big = nb201.build_supernet([two] * 6, C=4, N=1).eval()
    one = nb201.build_supernet([("nor_conv_3x3",)] + [two] * 5, C=4, N=1).eval()
    missing, unexpected = one.load_state_dict(big.state_dict(), strict=False)
    assert not missing and not unexpected  # skip ops have no weights; the rest match by name
    x = torch.randn(2, 3, 16, 16)
    edge = big.cells[0].layers[0]
    h = big.stem(x)
    assert torch.allclose(edge(h), (edge.ops["nor_conv_3x3"](h) + h) / 2)
    assert torch.equal(one.stem[0].weight, big.stem[0].weight)
    first = one.cells[0].layers[0]
    assert torch.equal(first(h), edge.ops["nor_conv_3x3"](h))


def test_float_noise_in_the_table_does_not_split_ties():
    """The table's means of three seeds differ by float noise (61.99333333333333 vs
    ...34): those archs share a rank, as do the 341 CIFAR-100 archs at chance."""
    from fastntk.spaces import nb201 as m

    archs = m.all_archs()
    for d in ("cifar10", "cifar100"):
        by_acc: dict[float, set[int]] = {}
        for a in archs[:3000]:
            by_acc.setdefault(m.accuracy(a, d), set()).add(m.rank(a, d))
        assert all(len(r) == 1 for r in by_acc.values())
    chance = [a for a in archs if abs(m.accuracy(a, "cifar100") - 1.0) < 1e-3]
    assert len(chance) > 100 and len({m.rank(a, "cifar100") for a in chance}) == 1
