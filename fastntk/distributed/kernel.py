"""One exact kernel over the ranks of a process group (:func:`ntk`), and a sketch with the
samples sharded over them (:func:`ntk_sketch`)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from fastntk import engine
from fastntk._progress import bar
from fastntk.distributed import group, tiles
from fastntk.distributed.store import Store
from fastntk.errors import InputError, OptionError

GATHERS = ("rank0", "all", None)
# samples per tile side: 256 keeps a tile's per-sample gradients within the engine's one
# chunk (DEFAULT_SAMPLE_CHUNK) and a float32 tile at 256 KiB
DEFAULT_TILE = 256
# a test hook: the rank (and the number of its tiles) after which it stops dead, as a
# killed process would (tests/test_distributed.py)
_DIE_ENV = "FASTNTK_DISTRIBUTED_DIE_AFTER"


def ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    gather: str | None = "rank0",
    out: str | os.PathLike | None = None,
    tile: int = DEFAULT_TILE,
    timeout: float | None = None,
    progress: bool | None = None,
    **options: Any,
) -> torch.Tensor | None:
    """The kernel ``fastntk.ntk(model, x1, x2, **options)``, computed by every rank of a
    ``torch.distributed`` process group, each taking its share of the tiles.

    Call it on every rank with the same arguments (a ``torchrun`` program). The process
    group is the caller's, or one started from torchrun's environment (gloo on CPUs, NCCL
    with GPU ``LOCAL_RANK`` per rank). Rank 0's parameters and buffers are the model's
    (broadcast to a copy on each rank; the caller's model is not changed), and the ranks'
    inputs are checked to be the same. Each rank computes its rows of tiles with the
    single-process engine (:func:`fastntk.engine.ntk_block`: the same rules, exact), only
    the upper triangle where ``x2`` is None.

    Args:
        model, x1, x2, options: as :func:`fastntk.ntk` (``output``, ``bn``, ``params``,
            ``method``, ``chunk_size``, ``dtype``; every output mode and BN mode, the
            coupled ``bn="batch"`` too: there every rank runs the whole batch's forward).
        gather: ``"rank0"``: Θ returned on rank 0, None elsewhere; ``"all"``: on every
            rank; None: nowhere (with ``out``).
        out: a ``.npy`` path: the kernel is written there as a memory map, each rank its
            own tiles, so no rank needs it in memory. Rerunning the same call skips the
            tiles already finished (a killed run resumes); a path holding another kernel
            is refused (:mod:`fastntk.distributed.store`).
        tile: samples per tile side.
        timeout: seconds a collective waits for a rank that stopped before raising
            (where this call starts the process group; default 600).
        progress: rank 0's progress bar of its tiles (None: where stderr is a terminal).

    Returns:
        Θ as :func:`fastntk.ntk` gives it, where ``gather`` asks for it on this rank;
        else None.

    Raises:
        fastntk.errors.DistributedError: no process group and no torchrun environment;
            ranks given different inputs; ``out`` holding another kernel; a rank that
            stopped or timed out. The errors of :func:`fastntk.ntk`.
    """
    if gather not in GATHERS:
        raise OptionError(f"gather must be 'rank0', 'all' or None, not {gather!r}")
    if gather is None and out is None:
        raise OptionError("gather=None returns nothing: pass out=PATH to keep the kernel")
    if options.get("method") == "sketch":
        raise OptionError("method='sketch': use fastntk.distributed.ntk_sketch")
    if not (isinstance(tile, int) and tile > 0):
        raise OptionError(f"tile must be a positive int, not {tile!r}")
    g = group.join(timeout)
    x1 = x1.to(g.device)
    x2 = None if x2 is None else x2.to(g.device)
    symmetric = x2 is None
    X = x1 if symmetric else torch.cat([x1, x2])
    n1 = x1.shape[0]
    n2 = n1 if symmetric else x2.shape[0]
    off = 0 if symmetric else n1  # columns' sample offset in X
    group.agree(g, "inputs (x1, x2)", group.digest(x1, x2))
    m = group.rank0_model(g, model)
    # one sample's kernel: the options checked (every rank raises alike) and the shape
    first = engine.ntk_block(m, X, [0], [0], **options)
    shape = (n1, n2, *first.shape[2:])
    rows = tiles.tiles(n1, n2, symmetric, tile)
    mine = tiles.assign(rows, g.world)
    store = None
    if out is not None:
        key = group.digest(X, *m.parameters(), *m.buffers())
        key += repr(sorted((k, repr(v)) for k, v in options.items() if k != "method"))
        key += f"symmetric={symmetric}"
        store = Store(g, os.fspath(out), shape, first.dtype, key)
    try:
        done = store.done() if store is not None else set()
        kept = _compute(g, m, X, mine[g.rank], done, store, off, symmetric, progress, options)
        if g.world > 1:
            with group.collective("the wait for the other ranks' tiles"):
                dist.barrier()
        if gather is None:
            return None
        if store is not None:
            theta = store.load().to(g.device) if g.rank == 0 or gather == "all" else None
        else:
            theta = _assemble(g, mine, kept, shape, first.dtype, symmetric, gather)
        if gather == "all" and store is None and g.world > 1:
            if theta is None:
                theta = torch.empty(shape, dtype=first.dtype, device=g.device)
            with group.collective("the broadcast of the kernel"):
                dist.broadcast(theta, src=0)
        return theta if (g.rank == 0 or gather == "all") else None
    finally:
        if store is not None:
            store.close()


def _compute(g, m, X, rows, done, store, off, symmetric, progress, options) -> dict:
    """This rank's rows of tiles: one ``ntk_block`` per row (its unfinished tiles' columns),
    cut into tiles, each written to ``store`` or kept. Returns {tile key: block}."""
    todo = [[t for t in row if t.key not in done] for row in rows]
    todo = [row for row in todo if row]
    die = os.environ.get(_DIE_ENV, "")
    die_rank, die_after = (int(v) for v in die.split(",")) if die else (-1, -1)
    kept: dict[str, torch.Tensor] = {}
    count = 0
    pbar = bar(sum(len(r) for r in todo), f"rank {g.rank}/{g.world} tiles", "tile",
               progress if g.rank == 0 else False)  # fmt: skip
    try:
        for row in todo:
            r_idx = list(range(row[0].r0, row[0].r1))
            c_idx = [off + c for t in row for c in range(t.c0, t.c1)]
            block = engine.ntk_block(m, X, r_idx, c_idx, **options)
            at = 0
            for t in row:
                w = t.c1 - t.c0
                part = block[:, at : at + w]
                at += w
                if store is not None:
                    store.write(t, part, symmetric)
                else:
                    kept[t.key] = part
                pbar.update()
                count += 1
                if g.rank == die_rank and count >= die_after:
                    os._exit(17)  # (test hook: a rank killed mid-run)
    finally:
        pbar.close()
    return kept


def _assemble(g, mine, kept, shape, dtype, symmetric, gather) -> torch.Tensor | None:
    """Θ on rank 0 from every rank's tiles: its own, and the others' received in the
    order both sides know (the assignment), tile by tile (no rank holds more than its
    tiles and, on rank 0, the kernel)."""
    if g.rank != 0:
        with group.collective("sending tiles to rank 0"):
            for row in mine[g.rank]:
                for t in row:
                    dist.send(kept.pop(t.key).contiguous(), dst=0)
        return None
    theta = torch.empty(shape, dtype=dtype, device=g.device)
    for r in range(g.world):
        for row in mine[r]:
            for t in row:
                if r == 0:
                    part = kept.pop(t.key)
                else:
                    part = torch.empty((t.r1 - t.r0, t.c1 - t.c0, *shape[2:]), dtype=dtype,
                                       device=g.device)  # fmt: skip
                    with group.collective(f"receiving tiles from rank {r}"):
                        dist.recv(part, src=r)
                theta[t.r0 : t.r1, t.c0 : t.c1] = part
                if symmetric and t.r0 != t.c0:
                    theta[t.c0 : t.c1, t.r0 : t.r1] = _mirror(part)
    return theta


def _mirror(part: torch.Tensor) -> torch.Tensor:
    """The tile below the diagonal from the one above: Θ_ji (and Θ_jiba for "full")."""
    return part.permute(1, 0, 3, 2) if part.dim() == 4 else part.T


def ntk_sketch(
    model: nn.Module,
    x: torch.Tensor,
    *,
    gather: str = "rank0",
    timeout: float | None = None,
    **options: Any,
) -> torch.Tensor | None:
    """``fastntk.ntk_sketch(model, x, **options)`` with the samples sharded over the ranks:
    each rank sketches a contiguous share of ``x`` with the same seed (the same hashes),
    so the shards' rows stack into the one sketch S (N, m) of all samples, Θ ≈ S Sᵀ.
    ``gather``: ``"rank0"`` (S on rank 0, None elsewhere) or ``"all"``. Other arguments
    as :func:`ntk`."""
    if gather not in ("rank0", "all"):
        raise OptionError(f"gather must be 'rank0' or 'all', not {gather!r}")
    g = group.join(timeout)
    x = x.to(g.device)
    group.agree(g, "inputs (x)", group.digest(x))
    m = group.rank0_model(g, model)
    n = x.shape[0]
    if n < g.world:
        raise InputError(f"{n} samples cannot be shared by {g.world} ranks")
    bounds = [n * r // g.world for r in range(g.world + 1)]
    S = engine.ntk_sketch(m, x[bounds[g.rank] : bounds[g.rank + 1]], **options)
    if g.world == 1:
        return S
    parts = [torch.empty((bounds[r + 1] - bounds[r], S.shape[1]), dtype=S.dtype, device=S.device)
             for r in range(g.world)]  # fmt: skip
    with group.collective("gathering the sketch"):
        dist.all_gather(parts, S.contiguous())
    return torch.cat(parts) if (g.rank == 0 or gather == "all") else None
