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


def test_alternate_leaves_out_a_method_that_cannot_compute_the_model():
    """vmap on a forward torch.func cannot trace (``.item()``): its cell names the error,
    auto and the floor are still timed, the ratio with vmap is left out."""
    zoo = load_bench("bench_hf_zoo")

    class Item(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) * (1.0 if x.sum().item() > -1e9 else 2.0)

    res = zoo._alternate(Item(), torch.randn(5, 3), "sum", 2)
    assert {"auto", "floor", "auto/floor", "vmap_error"} == set(res)
    row = {"model": "item", "output": "sum", "alternate": {**res, "repeat": 2}}
    line = zoo._table([row], argparse.Namespace(n=5, threads=1)).strip().splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == res["vmap_error"].split(":")[0] and cells[6] == "–", cells
