"""zero-cost-nas / NASLib measure adapters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fastntk import adapters
from fastntk.adapters import MEASURES, is_oom, measure
from fastntk.errors import OptionError
from fastntk.metrics import METRICS, compute_metrics


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5),
    )


def data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_one_measure_per_metric():
    assert set(MEASURES) == set(METRICS)
    for name, fn in MEASURES.items():
        assert callable(fn) and name in fn.__name__
    with pytest.raises(OptionError, match="unknown metric"):
        measure("synflow")


@pytest.mark.parametrize("name", ["lga", "fnorm", "cond"])
def test_matches_compute_metrics_and_leaves_net_unchanged(name):
    net = small_net()
    net.train()
    x, y = data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    v = MEASURES[name](net, x, y)
    assert isinstance(v, float)
    assert v == pytest.approx(compute_metrics(small_net(), x, y, [name])[name], rel=1e-5)
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
    [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     getattr(torch, "OutOfMemoryError", RuntimeError)("out of memory")],
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
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 3 bytes."))
