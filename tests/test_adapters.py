"""zero-cost-nas / NASLib measure adapters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fastntk import adapters
from fastntk import metrics as M
from fastntk.adapters import MEASURES, is_oom, measure
from fastntk.errors import OptionError
from fastntk.metrics import METRICS, NAS, compute_metrics


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_one_measure_per_metric():
    # every metric but those that need the harness network's blocks, bound by name
    assert set(MEASURES) == set(METRICS) - {"feature_entropy", "block_trainability"}
    for name, fn in MEASURES.items():
        assert callable(fn) and name in fn.__name__
    with pytest.raises(OptionError, match="unknown metric"):
        measure("synflow")
    with pytest.raises(OptionError, match="needs blocks="):
        measure("feature_entropy")
    net, (x, y) = small_net(), data()
    fe = measure("feature_entropy", blocks=["1", "4"])  # names: any net of the same layout
    assert fe(net, x, y) == pytest.approx(
        M.feature_entropy(net, x, ["1", "4"], bn=NAS["bn"]), rel=1e-12)  # fmt: skip
    bt = measure("block_trainability", blocks=["1", "2"])
    assert bt(net, x, y) == pytest.approx(
        M.block_trainability(net, x, ["1", "2"], bn=NAS["bn"]), rel=1e-12)  # fmt: skip


@pytest.mark.parametrize("name", ["lga", "fnorm", "cond"])
def test_matches_compute_metrics_and_leaves_net_unchanged(name):
    net = small_net()
    net.train()
    x, y = data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    v = MEASURES[name](net, x, y)
    assert isinstance(v, float)
    assert v == pytest.approx(compute_metrics(small_net(), x, y, [name], **NAS)[name], rel=1e-5)
    assert net.training and all(m.training for m in net.modules())
    for k, t in net.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_split_data_is_the_same_kernel_in_chunks():
    net, (x, y) = small_net(), data()
    v = MEASURES["lga"](net, x, y)
    v2 = MEASURES["lga"](net, x, y, split_data=2, loss_fn=nn.CrossEntropyLoss())
    assert v2 == pytest.approx(v, rel=1e-4)


def test_options_are_bound():
    net, (x, y) = small_net(), data()
    a = measure("fnorm", bn="batch")(net, x, y)
    assert a == pytest.approx(compute_metrics(small_net(), x, y, ["fnorm"], bn="batch")["fnorm"])


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        getattr(torch, "OutOfMemoryError", RuntimeError)("out of memory"),
    ],
)
def test_oom_retried_with_split_doubled(monkeypatch, exc):
    seen = []

    def fake(net, x, y, names, **kw):
        seen.append(kw.get("chunk_size"))
        with torch.no_grad():  # a failed attempt that dirtied the net must not leak
            net[1].running_mean.add_(1.0)
        if kw.get("chunk_size") is None or kw["chunk_size"] > 2:
            raise exc
        return {names[0]: 0.25}

    monkeypatch.setattr(adapters, "compute_metrics", fake)
    net, (x, y) = small_net(), data(8)
    assert measure("lga")(net, x, y) == 0.25
    assert seen == [None, 4, 2]  # split_data 1 -> 2 -> 4
    assert torch.equal(net[1].running_mean, torch.zeros(4))
    seen.clear()
    assert measure("lga")(net, x, y, split_data=2) == 0.25
    assert seen == [4, 2]


def test_oom_gives_up_at_single_samples_and_other_errors_propagate(monkeypatch):
    calls = []

    def always_oom(net, x, y, names, **kw):
        calls.append(kw.get("chunk_size"))
        raise RuntimeError("out of memory")

    monkeypatch.setattr(adapters, "compute_metrics", always_oom)
    net, (x, y) = small_net(), data(4)
    with pytest.raises(RuntimeError, match="out of memory"):
        measure("lga")(net, x, y)
    assert calls == [None, 2, 1]

    def broken(net, x, y, names, **kw):
        calls.append("x")
        raise ValueError("not an oom")

    calls.clear()
    monkeypatch.setattr(adapters, "compute_metrics", broken)
    with pytest.raises(ValueError):
        measure("lga")(net, x, y)
    assert calls == ["x"]


def test_is_oom():
    assert is_oom(RuntimeError("CUDA out of memory"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
    # what torch's CPU allocator raises when an allocation fails (it was not retried)
    assert is_oom(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
            "can't allocate memory: you tried to allocate 3 bytes."
        )
    )


def _tenas_cond(net, x):
    """TE-NAS's condition number (VITA-Group/TENAS, lib/procedures/ntk.py, get_ntk_n),
    re-written from its description: train-mode BatchNorm over the whole batch, one
    backward of the sum of each sample's logits, the gradients of the parameters named
    "weight" concatenated, Θ = G Gᵀ, λmax/λmin of its eigenvalues (ascending)."""
    import copy

    net = copy.deepcopy(net).double().train()
    out = net(x.double())
    logits = out[-1] if isinstance(out, tuple) else out
    rows = []
    for i in range(x.shape[0]):
        net.zero_grad()
        logits[i : i + 1].backward(torch.ones_like(logits[i : i + 1]), retain_graph=True)
        rows.append(torch.cat([p.grad.reshape(-1) for n, p in net.named_parameters()
                               if "weight" in n and p.grad is not None]))  # fmt: skip
    G = torch.stack(rows)
    lam = torch.linalg.eigvalsh(G @ G.T)
    return float(lam[-1] / lam[0])


def test_tenas_options_reproduce_tenas():
    """measure("ncn", **TENAS) is TE-NAS's -cond; the defaults (eval BatchNorm, every
    parameter) are another kernel, which the README says."""
    from fastntk.spaces import nb201

    torch.manual_seed(0)
    net = nb201.build_model("|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|avg_pool_3x3~0|"
                            "nor_conv_3x3~1|nor_conv_3x3~2|", C=4, N=1)  # fmt: skip
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    want = -_tenas_cond(net, x)
    got = measure("ncn", **adapters.TENAS, dtype=torch.float64)(net, x, None)
    assert got == pytest.approx(want, rel=1e-10)
    assert measure("ncn", **adapters.TENAS, dtype=torch.float64)(
        net, x, None, split_data=4
    ) == pytest.approx(want, rel=1e-10)
    assert MEASURES["ncn"](net, x.double(), None) != pytest.approx(want, rel=1e-2)


class _Registry:
    """zero-cost-nas / NASLib's measures package and find_measures, as they are written
    (foresight/pruners/measures/__init__.py, predictive.py): a decorator that registers
    ``measure_impl(net_orig, device, *args, **kwargs)`` calling the function on
    ``net_orig.get_prunable_copy(bn=bn)``; the harness sums the returned list."""

    def __init__(self):
        self.impls = {}

    def measure(self, name, bn=True, copy_net=True, force_clean=True, **impl_args):
        def make_impl(func):
            def measure_impl(net_orig, device, *args, **kwargs):
                net = net_orig.get_prunable_copy(bn=bn) if copy_net else net_orig
                return func(net, *args, **kwargs, **impl_args)

            if name in self.impls:
                raise KeyError(f"Duplicated measure! {name}")
            self.impls[name] = measure_impl
            return func

        return make_impl

    def find_measures(self, net, name, inputs, targets, split_data=1):
        import copy
        import types

        def copynet(self_, bn):
            c = copy.deepcopy(self_)
            if not bn:
                for m in c.modules():
                    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                        m.forward = types.MethodType(lambda s, x: x, m)
            return c

        net.get_prunable_copy = types.MethodType(copynet, net)
        v = self.impls[name](net, "cpu", inputs, targets, loss_fn=nn.CrossEntropyLoss(),
                             split_data=split_data)  # fmt: skip
        total = 0.0
        for i in range(len(v)):  # their sum_arr
            total += torch.sum(v[i])
        return total.item()


def test_register_in_a_zero_cost_registry(capsys):
    reg = _Registry()
    net, (x, y) = small_net(), data()
    key = adapters.register(reg, "lga", impl_args={"mode": "param"})  # (passed on by the registry)
    assert key == "fastntk_lga"
    assert reg.find_measures(net, key, x, y, split_data=2) == pytest.approx(
        MEASURES["lga"](net, x, y), rel=1e-5)  # fmt: skip
    assert capsys.readouterr().err == ""  # (no progress bar for split_data > 1)
    # bn=False: the harness's copy has identity BatchNorms: the kernel of that function
    key = adapters.register(reg, "fnorm", as_name="fnorm_nobn", copy_bn=False, dtype=torch.float64)
    nobn = nn.Sequential(*[m for m in small_net() if not isinstance(m, nn.BatchNorm2d)])
    assert reg.find_measures(net, key, x, y) == pytest.approx(
        MEASURES["fnorm"](nobn.double(), x.double(), y), rel=1e-10)  # fmt: skip

    # a constant kernel (an all-"none" cell gives one) is NaN in a harness, not a crash
    class Dead(nn.Module):  # the output does not depend on the input: Θ is constant
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 5)

        def forward(self, x):
            return self.fc(x.flatten(1) * 0)

    dead = Dead()
    key = adapters.register(reg, "lga", as_name="lga2")
    assert math.isnan(reg.find_measures(dead, key, x, y))
    with pytest.raises(OptionError, match="measures package"):
        adapters.register(object(), "lga")
    # the README's call: TENAS's bn reaches the metric (a bn= of register's own caught it)
    key = adapters.register(reg, "ncn", **adapters.TENAS, dtype=torch.float64)
    assert reg.find_measures(net, key, x, y) == pytest.approx(
        measure("ncn", **adapters.TENAS, dtype=torch.float64)(net, x, y), rel=1e-10)  # fmt: skip
    assert measure("ncn", **adapters.TENAS)(net, x, y) != pytest.approx(
        measure("ncn", params=adapters.TENAS["params"])(net, x, y), rel=1e-3)  # fmt: skip


def test_measure_options_and_inputs_checked():
    net, (x, y) = small_net(), data()
    with pytest.raises(OptionError, match="compute_metrics"):
        measure("lga", bogus=1)
    with pytest.raises(OptionError, match="binds names"):
        measure("lga", names=["fnorm"])
    for bad, match in (
        ({"bn": "bogus"}, "bn"),
        ({"output": "bad"}, "output"),
        ({"output": "full"}, "full"),
        ({"chunk_size": 0}, "chunk_size.s samples must be an int >= 1"),
        ({"errors": "bogus"}, "errors"),
        ({"progress": "yes"}, "progress"),
    ):
        with pytest.raises(OptionError, match=match):  # when made, not at the first call
            measure("lga", **bad)
    with pytest.raises(adapters.InputTypeError, match="torch.Tensor"):
        MEASURES["lga"](net, list(x), y)
    for bad in (True, 0, 1.5):
        with pytest.raises(OptionError, match="split_data"):
            MEASURES["lga"](net, x, y, split_data=bad)
    import numpy as np

    v = MEASURES["lga"](net, x, y)
    assert MEASURES["lga"](net, x, y, split_data=np.int64(2)) == pytest.approx(v, rel=1e-5)
    # a bound chunk_size smaller than split_data's chunks stays
    assert measure("lga", chunk_size=2)(net, x, y, split_data=2) == pytest.approx(v, rel=1e-5)
