"""pytest-benchmark suites: fastntk's timings as tables that can be saved and compared.

``pytest tests`` (and ``make test``) never collects these files: pyproject.toml's
``testpaths`` is ``tests``. They run when pytest is pointed at ``bench/``, from the
repository root::

    pytest bench/ --benchmark-only                        # time everything, print tables
    pytest bench/ --benchmark-only --benchmark-autosave   # ... and save the run in .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare    # ... next to the last saved run
    pytest bench/ --benchmark-only --benchmark-compare --benchmark-compare-fail=mean:10%
                                                          # ... and fail on a 10 % slowdown
    pytest bench/ --benchmark-disable -q                  # smoke: each body once, untimed

``make bench-save`` and ``make bench-compare`` run the second and fourth. A saved run
(``.benchmarks/<machine>/NNNN_<commit>_<date>.json``, ignored by git) records the
commit, the torch thread count, the sizes and fastntk's compiled paths next to the
timings (:func:`pytest_benchmark_update_machine_info`, :func:`pytest_benchmark_update_json`);
compare runs of one machine, at one ``OMP_NUM_THREADS`` (a comparison warns where these
settings differ). ``--benchmark-compare=NNNN`` picks an older run; ``pytest-benchmark
list`` and ``pytest-benchmark compare`` show saved runs without running anything. On a
machine shared with other jobs the mean moves with their load: ``min`` is the steadier
statistic to fail on (``make bench-compare BENCH_FAIL=min:10%``).

pyproject.toml's ``addopts`` carries ``--benchmark-disable`` (the test suite's
``benchmark`` fixtures run once, untimed); pytest-benchmark refuses ``--benchmark-only``
next to it, so :func:`pytest_configure` turns timing on when ``--benchmark-only`` is
asked for and ``--benchmark-disable`` is not on the command line itself.

The suites (one benchmark group per workload, so a table compares the providers):

* ``test_bench_providers.py``: the NAS-Bench-201 benchmark network on CIFAR-10 images,
  ``"sum"`` at N = ``--bench-n`` (32) and ``"trace"`` at N = ``--bench-trace-n``
  (``--bench-n // 4``): fastntk ``auto`` and ``layerwise``, torch.func ``vmap(jacrev)``,
  and the floor (a forward+backward per output dimension and the Gram of an (N, K·P)
  matrix: the least an exact method does).
* ``test_bench_rules.py``: a model of one layer per per-layer rule (Linear, Conv2d,
  BatchNorm2d, LayerNorm, MultiheadAttention, Embedding): ``fastntk.ntk`` vs ``vmap(jacrev)``.
* ``test_bench_ops.py``: the C++ extension's ``gram_sym`` / ``gram_cross`` vs ``torch.mm``
  and ``conv2d_psg`` vs unfold + bmm (skipped without the extension); the Triton Gram and
  per-sample-gradient kernels vs torch on a CUDA device (skipped without one: on the CPU
  they run only in Triton's interpreter, which is a check, not a timing).
* ``test_bench_search.py``: the searches' own bookkeeping (REA and REINFORCE on
  NAS-Bench-201 with a scorer that costs nothing) at 1,000 and 8,000 evaluations.

Peak memory per provider is not measured here (one process runs every benchmark):
``bench/bench_engine.py`` measures each provider in a fresh process.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastntk benchmarks")
    group.addoption(
        "--bench-n",
        type=int,
        default=32,
        help="samples of the NAS-Bench-201 'sum' workload and of the one-layer models (32)",
    )
    group.addoption(
        "--bench-trace-n",
        type=int,
        default=None,
        help="samples of the NAS-Bench-201 'trace' workload (default: --bench-n // 4)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """``--benchmark-only`` times the benchmarks despite the ``--benchmark-disable`` of addopts.

    pytest-benchmark builds its session in its own (``trylast``) ``pytest_configure``, so the
    option set here is read there. A ``--benchmark-disable`` typed on the command line
    stays, and pytest-benchmark reports the contradiction.
    """
    opt = config.option
    if not getattr(opt, "benchmark_only", False) or not getattr(opt, "benchmark_disable", False):
        return
    if "--benchmark-disable" not in config.invocation_params.args:
        opt.benchmark_enable = True


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """The settings a saved run's timings depend on, beyond pytest-benchmark's own fields.

    ``--benchmark-compare`` warns when these differ from the compared run's.
    """
    import torch

    import fastntk

    env = fastntk.env()
    machine_info["fastntk"] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "csrc": env["csrc"],
        "triton_runnable": env["triton_runnable"],
        "cuda_device": env["device_name"],
        "bench_n": config.getoption("--bench-n"),
        "bench_trace_n": _trace_n(config),
    }


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list, output_json: dict
) -> None:
    """What else a saved run records: the commit as ``bench/_meta.py`` names it (also where
    there is no ``.git``) and the machine's load when the run ended."""
    from _meta import git_sha

    output_json["fastntk"] = {
        "git": git_sha(),
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _trace_n(config: pytest.Config) -> int:
    n = config.getoption("--bench-trace-n")
    return n if n is not None else max(2, config.getoption("--bench-n") // 4)


@pytest.fixture(scope="session")
def bench_n(request: pytest.FixtureRequest) -> int:
    """Samples of the NAS-Bench-201 "sum" workload and of the one-layer models."""
    return request.config.getoption("--bench-n")


@pytest.fixture(scope="session")
def bench_trace_n(request: pytest.FixtureRequest) -> int:
    """Samples of the NAS-Bench-201 "trace" workload."""
    return _trace_n(request.config)
