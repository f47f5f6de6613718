"""bench/bench_hf_zoo.py's in-turn timing (``--alternate``): its ratios and its table."""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from bench_scripts import load_bench


def test_alternate_times_each_method_and_the_rounds_ratios():
    zoo = load_bench("bench_hf_zoo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    res = zoo._alternate(model, torch.randn(6, 3), "sum", 3)
    assert set(res) == {"auto", "vmap", "floor", "vmap/auto", "auto/floor"}
    assert all(v > 0 for v in res.values())
    row = {"model": "tiny", "output": "sum", "alternate": {**res, "repeat": 3}}
    table = zoo._table([row], argparse.Namespace(n=6, threads=1))
    cells = table.strip().splitlines()[-1].split("|")
    assert cells[1:4] == [" tiny ", " sum ", " 3 "]
    assert cells[7].strip() == f"{res['vmap/auto']:.2f}"
    # (a row without the per-process methods stays out of the main table)
    assert "| tiny | " not in table.split("### In turn")[0]
