"""bench/bench_operator.py's product journal: the long eigenvalue benchmark resumes from
the products stored so far, and a journal of another operator is refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from bench_scripts import load_bench

import fastntk
from fastntk.metrics import operator as OM


@pytest.fixture(scope="module")
def bench_operator():
    return load_bench("bench_operator")


def _operator(n=12):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(1))
    return fastntk.ntk_operator(m.double(), x.double(), dtype=torch.float64)


def test_a_rerun_replays_every_product(bench_operator, tmp_path):
    J = bench_operator.Journaled(_operator(), str(tmp_path))
    lam, est = OM.top_eigenvalues(J, 3, tol=1e-10)
    assert J.replayed == 0 and est.products > 0
    J2 = bench_operator.Journaled(_operator(), str(tmp_path))  # (a fresh process's)
    lam2, est2 = OM.top_eigenvalues(J2, 3, tol=1e-10)
    assert J2.replayed == est2.products == est.products  # nothing computed again
    assert J2.runs == 2 and np.array_equal(lam, lam2)
    assert J2.replayed_s == pytest.approx(sum(J.seconds.values()))
    dense = torch.linalg.eigvalsh(fastntk.ntk(_operator().model, _operator().x1,
                                              dtype=torch.float64))  # fmt: skip
    assert np.allclose(lam, dense.flip(0)[:3].numpy(), rtol=1e-8)
    with open(os.path.join(tmp_path, "log.jsonl")) as f:
        assert all("run" in rec or "seconds" in rec for rec in map(json.loads, f))


def test_a_journal_of_another_operator_is_refused(bench_operator, tmp_path):
    bench_operator.Journaled(_operator(12), str(tmp_path))
    with pytest.raises(SystemExit, match="another operator"):
        bench_operator.Journaled(_operator(10), str(tmp_path))
