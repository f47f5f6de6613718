"""fastntk.profile(): phase split, Gram FLOP count, no effect on the kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import zoo
from reference import TOL, full_kernel, reduce, rel_err

import fastntk
from fastntk import profiling
from fastntk.errors import OptionError


def _convnet():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.Tanh(), nn.Conv2d(4, 2, 3, bias=False), nn.Flatten()
    ).double()
    return m, torch.randn(5, 3, 7, 7, dtype=torch.float64)


def test_phases_and_exact_gram_flops():
    """Conv-only model: every block is dense, so the Gram issues exactly 2·N²·P FLOPs."""
    m, x = _convnet()
    P = sum(p.numel() for p in m.parameters())
    with fastntk.profile() as prof:
        theta = fastntk.ntk(m, x, method="layerwise")
    assert prof.gram_flops == 2.0 * 5 * 5 * P
    for ph in ("forward", "backward", "per_sample", "gram"):
        assert prof.seconds[ph] > 0, ph
    assert sum(prof.seconds.values()) <= prof.total_s + 1e-9
    assert prof.other_s >= 0 and prof.gram_tflops > 0
    d = prof.as_dict()
    assert set(d) >= {f"{p}_s" for p in profiling.PHASES} | {"total_s", "gram_tflops"}
    assert "| gram |" in prof.table() and "GFLOP" in prof.table()
    assert rel_err(theta, reduce(full_kernel(m, x, None), "sum")) <= TOL[torch.float64]


def test_profile_does_not_change_the_kernel():
    m, x1, x2 = zoo.make("nb201")
    plain = fastntk.ntk(m, x1, x2, output="trace", dtype=torch.float64)
    with fastntk.profile():
        profiled = fastntk.ntk(m, x1, x2, output="trace", dtype=torch.float64)
    assert torch.equal(plain, profiled)


@pytest.mark.parametrize(
    "kwargs,phases",
    [
        (dict(method="vmap"), ("jacobian", "gram")),
        (dict(bn="batch"), ("forward", "jacobian", "gram")),
    ],
    ids=["vmap", "coupled"],
)
def test_other_paths_report_their_phases(kwargs, phases):
    m, x1, _ = zoo.make("resnet")
    with fastntk.profile() as prof:
        fastntk.ntk(m, x1, dtype=torch.float64, **kwargs)
    for ph in phases:
        assert prof.seconds[ph] > 0, ph
    P = sum(p.numel() for p in m.parameters())
    n = x1.shape[0]
    assert prof.gram_flops == 2.0 * n * n * P


@pytest.mark.parametrize("method", ["layerwise", "vmap"])
def test_trace_gram_flops_count_matching_logits_only(method):
    """ "trace" contracts logit k with logit k: 2·N²·K·P FLOPs on every path."""
    m, x = _convnet()
    K = m(x).shape[1]
    P = sum(p.numel() for p in m.parameters())
    with fastntk.profile() as prof:
        fastntk.ntk(m, x, output="trace", method=method)
    assert prof.gram_flops == 2.0 * 5 * 5 * K * P


def test_sketch_phase_and_fallback_phase():
    m, x1, _ = zoo.make("outside")  # a weight also used outside its module: torch.func fallback
    with fastntk.profile() as prof:
        fastntk.ntk(m, x1, dtype=torch.float64)
    assert prof.seconds["fallback"] > 0
    m, x1, _ = zoo.make("vit")
    with fastntk.profile() as prof:
        fastntk.ntk_sketch(m, x1, sketch_dim=64, dtype=torch.float64)
    assert prof.seconds["sketch"] > 0 and prof.gram_flops == 0


def test_profiles_do_not_nest_and_reset_after_errors():
    m, x = _convnet()
    with fastntk.profile():
        with pytest.raises(OptionError, match="already active"):
            with fastntk.profile():
                pass
    with pytest.raises(fastntk.FastNTKError):
        with fastntk.profile():
            fastntk.ntk(m, x[:0])
    assert profiling._current is None
    with fastntk.profile() as prof:  # usable again
        fastntk.ntk(m, x)
    assert prof.gram_flops > 0


def test_no_profile_no_bookkeeping():
    m, x = _convnet()
    fastntk.ntk(m, x)
    assert profiling._current is None
    with profiling.phase("gram"):  # inert without an active profile
        pass
