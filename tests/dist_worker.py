"""One rank of tests/test_distributed.py: ``python dist_worker.py SCENARIO DIR`` under a
torchrun-like environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Rank r saves what
it returned to DIR/rank<r>.pt; a fastntk error exits 3 with its type and message on
stderr."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

import fastntk.distributed as fd
from fastntk.errors import FastNTKError


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).double()  # fmt: skip


def inputs(rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(10, 3, 5, 5, generator=g, dtype=torch.float64)
    x2 = torch.randn(7, 3, 5, 5, generator=g, dtype=torch.float64)
    return x1, x2


# name -> kwargs of fastntk.distributed.ntk (x2: use the second batch)
CASES = {
    "sum": dict(output="sum"),
    "trace": dict(output="trace"),
    "full": dict(output="full"),
    "cross": dict(output="sum", x2=True),
    "batch": dict(output="trace", bn="batch"),
    "batch-cross": dict(output="sum", bn="batch", x2=True),
    "per_sample-full": dict(output="full", bn="per_sample"),
}


def run(scenario: str, out_dir: str) -> dict:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    m = model()
    x1, x2 = inputs()
    res: dict = {}
    if scenario == "kernels":
        for name, kw in CASES.items():
            kw = dict(kw)
            other = x2 if kw.pop("x2", False) else None
            res[name] = fd.ntk(m, x1, other, tile=4, dtype=torch.float64, **kw)
        res["all"] = fd.ntk(m, x1, gather="all", tile=3, output="trace", dtype=torch.float64)
        fd.ntk(m, x1, gather=None, out=os.path.join(out_dir, "K.npy"), tile=4,
               output="full", dtype=torch.float64)  # fmt: skip
        res["sketch"] = fd.ntk_sketch(m, x1, sketch_dim=32, seed=5, gather="all")
        res["unchanged"] = all(
            torch.equal(a, b) for a, b in zip(model().state_dict().values(),
                                              m.state_dict().values(), strict=True))  # fmt: skip
    elif scenario == "resume":  # (FASTNTK_DISTRIBUTED_DIE_AFTER set by the test)
        res["K"] = fd.ntk(m, x1, out=os.path.join(out_dir, "K.npy"), tile=2, timeout=20,
                          dtype=torch.float64)  # fmt: skip
    elif scenario == "different-inputs":
        fd.ntk(m, x1 + rank, dtype=torch.float64)
    elif scenario == "other-kernel":
        path = os.path.join(out_dir, "K.npy")
        fd.ntk(m, x1, gather=None, out=path, dtype=torch.float64)
        fd.ntk(m, x2, gather=None, out=path, dtype=torch.float64)
    elif scenario == "foreign-file":
        fd.ntk(m, x1, gather=None, out=os.path.join(out_dir, "foreign.npy"))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    return res


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], sys.argv[2]
    try:
        res = run(scenario, out_dir)
    except FastNTKError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    torch.save(res, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
