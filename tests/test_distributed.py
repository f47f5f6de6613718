"""fastntk.distributed on two gloo ranks over loopback, started as torchrun starts them
(one process per rank, ``tests/dist_worker.py``), held to the single-process kernel in
float64: every output mode, cross-kernels, the BN modes (the coupled ``bn="batch"``
too), ``gather="all"``, an ``out=`` kernel, the sharded sketch; a rank killed mid-run
and the rerun that resumes; the errors of bad use."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from reference import rel_err

import fastntk
from fastntk.distributed import spawn_local, tiles
from fastntk.errors import DistributedError

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dist_worker as W  # noqa: E402

EXACT = 1e-12  # the bound; tiles are the single-process engine's own blocks


def launch(scenario: str, out_dir, world: int = 2, env: dict | None = None, timeout=240):
    """Start ``world`` ranks of ``dist_worker.py``; returns [(returncode, stderr)] by rank."""
    procs = spawn_local([sys.executable, os.path.join(HERE, "dist_worker.py"), scenario,
                         str(out_dir)], world, env=env)  # fmt: skip
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def _reference(name: str) -> torch.Tensor:
    kw = dict(W.CASES[name])
    x1, x2 = W.inputs()
    other = x2 if kw.pop("x2", False) else None
    return fastntk.ntk(W.model(), x1, other, dtype=torch.float64, **kw)


def test_two_ranks_give_the_single_process_kernel(tmp_path):
    res = launch("kernels", tmp_path)
    assert [rc for rc, _ in res] == [0, 0], res
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for name in W.CASES:
        assert r0[name] is not None and r1[name] is None, name  # gather="rank0"
        assert rel_err(r0[name], _reference(name)) <= EXACT, name
    x1, _ = W.inputs()
    trace = fastntk.ntk(W.model(), x1, output="trace", dtype=torch.float64)
    assert rel_err(r0["all"], trace) <= EXACT and rel_err(r1["all"], trace) <= EXACT
    full = fastntk.ntk(W.model(), x1, output="full", dtype=torch.float64)
    written = torch.from_numpy(np.load(tmp_path / "K.npy"))
    assert rel_err(written, full) <= EXACT
    with open(tmp_path / "K.npy.json") as f:
        assert json.load(f)["shape"] == list(full.shape)
    # the sketch's shards are the rows of the one sketch (the same hashes on every rank)
    sketch = fastntk.ntk_sketch(W.model(), x1, sketch_dim=32, seed=5)
    assert rel_err(r0["sketch"], sketch) <= EXACT and rel_err(r1["sketch"], sketch) <= EXACT
    assert r0["unchanged"] and r1["unchanged"]


def test_a_killed_rank_stops_the_other_and_the_rerun_resumes(tmp_path):
    """Rank 1 dies (os._exit) after its first tile: rank 0 raises DistributedError within
    the timeout, the tiles both finished are logged, and the rerun computes only the rest
    (no tile twice) and gives the kernel."""
    res = launch("resume", tmp_path, env={"FASTNTK_DISTRIBUTED_DIE_AFTER": "1,1"})
    (rc0, err0), (rc1, _) = res
    assert rc1 == 17, res
    assert rc0 == 3 and "DistributedError" in err0 and "rerun" in err0, err0
    logged = _logged(tmp_path)
    n_tiles = sum(len(row) for row in tiles.tiles(10, 10, True, 2))
    assert 0 < len(logged) < n_tiles
    res = launch("resume", tmp_path)
    assert [rc for rc, _ in res] == [0, 0], res
    again = _logged(tmp_path)
    assert len(again) == n_tiles and len(set(again)) == n_tiles  # each tile once, in all
    K = torch.load(tmp_path / "rank0.pt")["K"]
    assert rel_err(K, _reference("sum")) <= EXACT


def _logged(path) -> list[str]:
    keys = []
    for f in sorted(os.listdir(path)):
        if f.startswith("K.npy.rank") and f.endswith(".done"):
            keys += (path / f).read_text().split()
    return keys


@pytest.mark.parametrize(
    "scenario, message",
    [
        ("different-inputs", "different inputs"),
        ("other-kernel", "holds another kernel"),
        ("foreign-file", "not a fastntk kernel"),
    ],
)
def test_bad_use_raises_on_every_rank(tmp_path, scenario, message):
    if scenario == "foreign-file":
        np.save(tmp_path / "foreign.npy", np.zeros(3))
    res = launch(scenario, tmp_path)
    for rc, err in res:
        assert rc == 3 and "DistributedError" in err and message in err, res


def test_no_process_group_and_no_torchrun_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    x1, _ = W.inputs()
    with pytest.raises(DistributedError, match="torchrun"):
        fastntk.distributed.ntk(W.model(), x1)


def test_tiles_cover_the_kernel_once_and_balance_the_ranks():
    for n1, n2, sym, size in ((10, 10, True, 3), (10, 7, False, 4), (1, 1, True, 5)):
        rows = tiles.tiles(n1, n2, sym, size)
        covered = np.zeros((n1, n2), dtype=int)
        for row in rows:
            for t in row:
                covered[t.r0 : t.r1, t.c0 : t.c1] += 1
                if sym and t.r0 != t.c0:
                    covered[t.c0 : t.c1, t.r0 : t.r1] += 1
        assert (covered == 1).all(), (n1, n2, sym)
        for world in (1, 2, 3):
            mine = tiles.assign(rows, world)
            assert sorted(t.key for m in mine for row in m for t in row) == sorted(
                t.key for row in rows for t in row
            )
    rows = tiles.tiles(64, 64, True, 8)
    loads = [sum(tiles.cost(r) for r in m) for m in tiles.assign(rows, 2)]
    assert max(loads) <= 1.1 * min(loads), loads


def test_block_of_the_coupled_kernel_is_the_whole_batchs():
    """ntk_block under bn="batch": the rows' and columns' samples differentiated through
    the forward of the whole batch (not of the block's samples alone)."""
    x1, _ = W.inputs()
    m = W.model()
    whole = fastntk.ntk(m, x1, bn="batch", output="full", dtype=torch.float64)
    rows, cols = [1, 4, 7], [0, 4, 9]
    block = fastntk.engine.ntk_block(m, x1, rows, cols, bn="batch", output="full",
                                     dtype=torch.float64)  # fmt: skip
    assert rel_err(block, whole[rows][:, cols]) <= EXACT
    alone = fastntk.ntk(m, x1[rows], x1[cols], bn="batch", output="full", dtype=torch.float64)
    assert rel_err(alone, whole[rows][:, cols]) > 1e-3  # (what a block must not be)
