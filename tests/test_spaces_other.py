"""DARTS, ResNet and ViT spaces: sampling, mutation, encoding, building."""

from __future__ import annotations

import random

import pytest
import torch

from fastntk.errors import ArchitectureError, OptionError
from fastntk.spaces.base import SearchSpace
from fastntk.spaces.registry import get_space, space_names

SPACES = ["darts", "resnet", "vit"]


@pytest.mark.parametrize("name", SPACES)
def test_protocol_and_registry(name):
    space = get_space(name)
    assert isinstance(space, SearchSpace)
    assert space.name == name
    assert name in space_names()


def test_unknown_space_lists_known():
    with pytest.raises(OptionError, match="darts, nb201, resnet, vit"):
        get_space("nasbench101")


@pytest.mark.parametrize("name", SPACES)
def test_sample_mutate_stay_in_space_and_round_trip(name):
    space = get_space(name)
    rng = random.Random(0)
    decisions = space.decisions()
    for _ in range(30):
        a = space.sample(rng)
        s = space.encode(a)
        assert isinstance(s, str)
        assert space.decode(s) == a
        assert space.encode(space.decode(s)) == s
        b = space.mutate(a, rng)
        assert space.encode(space.decode(space.encode(b))) == space.encode(b)
        ca, cb = space.to_choices(a), space.to_choices(b)
        assert len(ca) == len(cb) == len(decisions)
        for (_, allowed), v in zip(decisions, cb, strict=True):
            assert v in allowed
        if name == "darts":
            # one slot changes (sorting within a node may move the other slot)
            assert a != b
            diff_nodes = sum(
                na != nb
                for ca_, cb_ in zip(a, b, strict=True)
                for na, nb in zip(ca_, cb_, strict=True)
            )
            assert diff_nodes == 1
        else:
            assert sum(x != y for x, y in zip(ca, cb, strict=True)) == 1
        assert space.from_choices(ca) == a


@pytest.mark.parametrize("name", SPACES)
def test_sampling_is_seeded(name):
    space = get_space(name)
    a = [space.encode(space.sample(random.Random(7))) for _ in range(2)]
    assert a[0] == a[1]


@pytest.mark.parametrize(
    "name,bad",
    [
        ("darts", ""),
        ("darts", "normal=sep_conv_3x3~0,sep_conv_3x3~1"),
        ("darts", "normal=conv_7x7~0,sep_conv_3x3~1|a~0,b~1|c~0,d~1|e~0,f~1;reduce=x~0,y~1"),
        ("resnet", "64x2-128x2-256x2"),
        ("resnet", "64x2-128x2-256x2-500x2"),
        ("resnet", "64x2-128x9-256x2-512x2"),
        ("vit", "d6-e384-h6-m4"),
        ("vit", "d6-e385-h6-m4-p4"),
        ("vit", "x6-e384-h6-m4-p4"),
        # non-ASCII digits (int() reads them: a plain ValueError, or a silent misread)
        ("darts", "normal=sep_conv_3x3~0,sep_conv_3x3~\u00b2"),
        ("resnet", "\uff16\uff14x2-128x2-256x2-512x2"),
        ("vit", "d6-e384-h6-m4-p\u0664"),
    ],
)
def test_decode_rejects_malformed(name, bad):
    with pytest.raises(ArchitectureError):
        get_space(name).decode(bad)


def test_darts_input_out_of_range():
    from fastntk.spaces.darts import DARTS_V2, decode

    g = decode(DARTS_V2)
    bad = DARTS_V2.replace("dil_conv_3x3~2", "dil_conv_3x3~5")
    with pytest.raises(ArchitectureError, match="earlier node"):
        decode(bad)
    # the two inputs of a node are unordered: either order decodes to the same genotype
    swapped = DARTS_V2.replace("sep_conv_3x3~1,skip_connect~0", "skip_connect~0,sep_conv_3x3~1")
    assert decode(swapped) == g


@pytest.mark.parametrize(
    "name,arch",
    [
        ("darts", None),
        ("resnet", "16x1-32x1-64x1-128x1"),
        ("resnet", "32x2-16x1-16x2-64x1"),
        ("vit", "d2-e96-h3-m2-p4"),
        ("vit", "d1-e192-h4-m1-p8"),
    ],
)
def test_build_forward(name, arch):
    space = get_space(name, **({"C": 8, "layers": 5} if name == "darts" else {}))
    a = space.sample(random.Random(1)) if arch is None else space.decode(arch)
    torch.manual_seed(0)
    model = space.build(a, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_reference_models():
    from fastntk.spaces.darts import DARTS_V2, build_model
    from fastntk.spaces.resnet import resnet18
    from fastntk.spaces.vit import vit_small

    with torch.device("meta"):  # shapes and counts only: no init cost
        r18 = resnet18()
        vit = vit_small()
    assert sum(p.numel() for p in r18.parameters()) == 11_173_962  # torchvision's + CIFAR stem
    assert get_space("resnet").encode(((64, 2), (128, 2), (256, 2), (512, 2))) == (
        "64x2-128x2-256x2-512x2"
    )
    assert vit.patch_embed.kernel_size == (4, 4)
    assert vit.pos_embed.shape == (1, 65, 384)
    assert sum(p.numel() for p in vit.parameters()) == 10_695_562
    with torch.no_grad():
        assert build_model(DARTS_V2, C=8, layers=5)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_choice_space_gives_sample_and_mutate():
    from fastntk.spaces.base import ChoiceSpace

    class Letters(ChoiceSpace):  # a user's space: three decisions, archs are strings
        def decisions(self):
            return [("a", ("x", "y")), ("b", ("p", "q", "r")), ("c", ("u", "v"))]

        def to_choices(self, arch):
            return tuple(arch)

        def from_choices(self, values):
            return "".join(values)

    space = Letters()
    for seed in range(40):
        a = space.sample(random.Random(seed))
        assert a == space.sample(random.Random(seed))
        b = space.mutate(a, random.Random(seed))
        assert sum(u != v for u, v in zip(a, b, strict=True)) == 1
        for (_, allowed), v in zip(space.decisions(), b, strict=True):
            assert v in allowed
    rng = random.Random(0)
    seen = {space.sample(rng) for _ in range(200)}
    assert len(seen) == 12  # every combination is drawn


@pytest.mark.parametrize(
    "name,bad",
    [
        ("darts", (("sep_conv_3x3", "skip_connect"),) * 2),  # nodes as strings
        ("darts", ((("sep_conv_3x3~0", "skip_connect~1"),) * 4,) * 2),  # pairs as strings
        ("darts", ((1, 2, 3, 4), (1, 2, 3, 4))),
        ("vit", (6.9, 384, 6, 4, 4)),
        ("vit", ("6", 384, 6, 4, 4)),
        ("vit", (True, 384, 6, 4, 4)),
        ("resnet", ((64.7, 2), (128, 2), (256, 2), (512, 2))),
    ],
)
def test_malformed_archs_are_architecture_errors(name, bad):
    space = get_space(name)
    with pytest.raises(ArchitectureError):
        space.encode(bad)


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("num_classes", [0, -3, 2.5])
def test_num_classes_checked(name, num_classes):
    space = get_space(name)
    arch = space.sample(random.Random(0))
    with pytest.raises(OptionError, match="num_classes"):
        space.build(arch, num_classes=num_classes)


def test_space_options_checked():
    from fastntk.spaces import darts

    with pytest.raises(OptionError, match="C must be"):
        darts.build_model(get_space("darts").sample(random.Random(0)), C=0)
    with pytest.raises(OptionError, match="takes"):
        get_space("nb201", foo=1)


def test_darts_nodes_take_two_distinct_inputs():
    """DARTS keeps the two strongest edges from distinct nodes: a node on one input twice
    was accepted, and most sampled genotypes had one (slots drawn independently)."""
    from fastntk.spaces.darts import DARTS_V2, decode

    same = DARTS_V2.replace("sep_conv_3x3~0,sep_conv_3x3~1", "sep_conv_3x3~0,sep_conv_5x5~0", 1)
    assert same != DARTS_V2
    with pytest.raises(ArchitectureError, match="distinct"):
        decode(same)
    space = get_space("darts")
    rng = random.Random(0)
    seen_pairs = set()
    for _ in range(300):
        g = space.sample(rng)
        assert space.from_choices(space.to_choices(g)) == g
        child = space.mutate(g, rng)
        assert child != g
        for a in (g, child):
            for cell in a:
                for (_, i), (_, j) in cell:
                    assert i != j
        changed = sum(
            len(set(na) - set(nb))
            for ca, cb in zip(g, child, strict=True)
            for na, nb in zip(ca, cb, strict=True)
        )
        assert changed == 1  # one (op, input) pair
        seen_pairs |= {tuple(sorted(i for _, i in node)) for node in g[0][3:]}
    assert seen_pairs == {(i, j) for j in range(5) for i in range(j)}  # node 3: all 10 pairs
    sizes = [len(ch) for _, ch in space.decisions()]
    assert len(sizes) == 24 and sizes[:3] == [1, 7, 7] and sizes[9:12] == [10, 7, 7]


def test_supernet_of_a_non_list_is_an_architecture_error():
    from fastntk.spaces import nb201

    with pytest.raises(ArchitectureError, match="list of 6 edges"):
        nb201.build_supernet(5)


def test_numbers_of_the_spaces_checked_alike():
    """num_classes (and NB201's C, N) as ints, numpy ints accepted, bools and
    non-positive values refused with OptionError in every space; a ResNet choice list of
    the wrong length and a DARTS input index given as a numpy int (helper-23's review)."""
    import numpy as np

    from fastntk.errors import ArchitectureError, OptionError
    from fastntk.spaces import darts, nb201, resnet, vit

    arch = "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|none~0|none~1|avg_pool_3x3~2|"
    assert (
        nb201.build_model(arch, num_classes=np.int64(3), C=np.int32(2), N=1).classifier.out_features
        == 3
    )
    for bad in (True, 0, 2.0):
        with pytest.raises(OptionError, match="num_classes"):
            nb201.build_model(arch, num_classes=bad, C=2, N=1)
        with pytest.raises(OptionError, match="num_classes"):
            resnet.resnet18(num_classes=bad)
        with pytest.raises(OptionError, match="num_classes"):
            vit.vit_small(num_classes=bad, depth=1)
    with pytest.raises(OptionError, match="N must be an int >= 0"):
        nb201.build_model(arch, C=2, N=-1)
    space = resnet.ResNetSpace()
    good = space.to_choices(space.sample(__import__("random").Random(0)))
    for wrong in (good[:2], [*good, 64]):
        with pytest.raises(ArchitectureError, match="a ResNet arch has 8 decisions"):
            space.from_choices(wrong)
    g = darts.validate(darts.DARTS_V2)  # (normal, reduce) cells of (op, input) pairs
    numpy_inputs = tuple(
        tuple(tuple((op, np.int64(i)) for op, i in node) for node in cell) for cell in g
    )
    assert darts.validate(numpy_inputs) == g
    assert all(
        type(i) is int for cell in darts.validate(numpy_inputs) for node in cell for _, i in node
    )
    normal = list(g[0])
    normal[0] = (("sep_conv_3x3", 0.0), ("sep_conv_3x3", 1))
    with pytest.raises(ArchitectureError, match="must be an integer node index"):
        darts.validate((tuple(normal), g[1]))
