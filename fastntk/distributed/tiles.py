"""Tiles of a kernel and their ranks.

The (N1, N2) kernel is cut into square tiles of ``size`` samples; when ``x2`` is None only
the tiles on and above the diagonal are computed (the others are their transposes). The
work of a rank is whole rows of tiles: a row is one engine call, ``ntk_block(X, I, J)``
for the row's samples ``I`` against all its columns ``J``, so each sample's per-sample
gradients are computed once per row it takes part in, not once per tile. Rows are
balanced over the ranks by their cost, largest first onto the least loaded rank
(longest-processing-time order), ``|I| |J| + c (|I| + |J|)``: the Gram's multiply-adds
per column of the per-sample gradients, and the per-sample gradients themselves at
``c = GRADIENT_WEIGHT`` Gram columns each.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

# the cost of one sample's per-sample gradients, in tile entries (a Gram row): computing
# them is a forward+backward share, several times the cost of one Gram entry per column
GRADIENT_WEIGHT = 64


@dataclass(frozen=True)
class Tile:
    """Rows ``r0:r1`` of the kernel against columns ``c0:c1`` (sample indices of x1 and of
    x2, or of x1 twice)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def key(self) -> str:
        return f"{self.r0}:{self.r1},{self.c0}:{self.c1}"


def tiles(n1: int, n2: int, symmetric: bool, size: int) -> list[list[Tile]]:
    """The tiles of an (n1, n2) kernel, by row of tiles (upper triangle where symmetric)."""
    out = []
    for r0 in range(0, n1, size):
        r1 = min(n1, r0 + size)
        start = r0 if symmetric else 0
        out.append([Tile(r0, r1, c0, min(n2, c0 + size)) for c0 in range(start, n2, size)])
    return out


def cost(row: list[Tile]) -> int:
    if not row:
        return 0
    rows = row[0].r1 - row[0].r0
    cols = sum(t.c1 - t.c0 for t in row)
    return rows * cols + GRADIENT_WEIGHT * (rows + cols)


def assign(rows: list[list[Tile]], world: int) -> list[list[list[Tile]]]:
    """The rows of tiles of each rank (balanced by :func:`cost`; deterministic: ties go to
    the lower rank and the earlier row)."""
    loads = [(0, r) for r in range(world)]
    heapq.heapify(loads)
    mine: list[list[list[Tile]]] = [[] for _ in range(world)]
    for i in sorted(range(len(rows)), key=lambda i: (-cost(rows[i]), i)):
        load, r = heapq.heappop(loads)
        mine[r].append(rows[i])
        heapq.heappush(loads, (load + cost(rows[i]), r))
    for m in mine:
        m.sort(key=lambda row: row[0].r0)
    return mine
