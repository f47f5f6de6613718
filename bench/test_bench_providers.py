"""NAS-Bench-201 benchmark network: fastntk's paths vs torch.func ``vmap(jacrev)`` vs the floor.

One benchmark group per kernel output, so its table compares the providers on one
workload (``_providers.nb201_workload``): ``"sum"`` at N = ``--bench-n`` and ``"trace"``
(K = 10 backward passes) at N = ``--bench-trace-n``. The exact providers must agree
with the first one timed (float32, to 1e-3 of the kernel's largest entry).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from _providers import make_floor, nb201_workload, vmap_jacrev_ntk

import fastntk

CASES = [
    (output, provider)
    for output in ("sum", "trace")
    for provider in ("floor", "auto", "layerwise", "vmap_jacrev")
]


@pytest.fixture(scope="module")
def workload(bench_n: int, bench_trace_n: int):
    """output -> {"n", "model", "x", "theta": the first exact kernel computed}, built once."""
    built: dict[str, dict] = {}

    def get(output: str) -> dict:
        if output not in built:
            n = bench_n if output == "sum" else bench_trace_n
            model, x = nb201_workload(n)
            built[output] = {"n": n, "model": model, "x": x, "theta": None}
        return built[output]

    return get


@pytest.mark.parametrize(("output", "provider"), CASES, ids=[f"{o}-{p}" for o, p in CASES])
def test_nb201(benchmark, workload, output: str, provider: str) -> None:
    w = workload(output)
    model, x, n = w["model"], w["x"], w["n"]
    benchmark.group = f"nb201 {output} N={n}"
    benchmark.extra_info.update(n=n, output=output, provider=provider)
    if provider == "floor":
        fn = make_floor(model, x, output)
    elif provider == "vmap_jacrev":
        fn = partial(vmap_jacrev_ntk, model, x, output)
    else:
        fn = partial(fastntk.ntk, model, x, output=output, method=provider)

    # one untimed call first: pytest-benchmark sizes its rounds from one call, and a cold
    # one (lazy imports) misleads it (see test_bench_rules.py)
    if benchmark.enabled:
        fn()
    theta = benchmark(fn)

    assert theta.shape == (n, n) and bool(torch.isfinite(theta).all())
    if provider != "floor":  # the floor's Gram is of a random matrix
        ref = w["theta"] = theta if w["theta"] is None else w["theta"]
        torch.testing.assert_close(theta, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
