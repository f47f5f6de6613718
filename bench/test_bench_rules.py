"""Per-layer rules: ``fastntk.ntk`` vs torch.func ``vmap(jacrev)`` on a model of one layer.

One benchmark group per layer type (``_providers.one_layer``: Linear, Conv2d, BatchNorm2d,
LayerNorm, MultiheadAttention, Embedding), N = ``--bench-n``, output ``"sum"``. Every
parameter must take its layer's rule (``fastntk.explain``), so the group times the rule,
and the two kernels must agree (float32, to 1e-3 of the largest entry).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from _providers import LAYERS, one_layer, vmap_jacrev_ntk

import fastntk

CASES = [(kind, provider) for kind in LAYERS for provider in ("fastntk", "vmap_jacrev")]


@pytest.fixture(scope="module")
def layer(bench_n: int):
    """kind -> {"model", "x", "theta": the first kernel computed}, built once."""
    built: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in built:
            model, x = one_layer(kind, bench_n)
            built[kind] = {"model": model, "x": x, "theta": None}
        return built[kind]

    return get


# vmap runs the CPU's fused attention through its per-sample fallback (torch warns: "There
# is a performance drop"): what a torch.func user gets, and part of what is timed.
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize(("kind", "provider"), CASES, ids=[f"{k}-{p}" for k, p in CASES])
def test_rule(benchmark, layer, kind: str, provider: str) -> None:
    w = layer(kind)
    model, x = w["model"], w["x"]
    n = x.shape[0]
    benchmark.group = f"rule {kind} N={n}"
    benchmark.extra_info.update(n=n, layer=kind, provider=provider)
    if provider == "fastntk":
        paths = {p.path.split(" ")[0] for p in fastntk.explain(model, x).params}
        assert len(paths) == 1 and paths.pop().startswith("rule:"), paths
        fn = partial(fastntk.ntk, model, x)
    else:
        fn = partial(vmap_jacrev_ntk, model, x)

    # pytest-benchmark sizes its rounds from one call: a cold first one (lazy imports) made
    # it take 5 rounds of the Linear rule instead of 366 (1.2 ms a call)
    if benchmark.enabled:
        fn()
    theta = benchmark(fn)

    assert theta.shape == (n, n)
    ref = w["theta"] = theta if w["theta"] is None else w["theta"]
    torch.testing.assert_close(theta, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
