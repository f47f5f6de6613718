"""The sketch's hashes and their projection of per-sample gradient blocks
(:func:`fastntk.ntk_sketch`)."""

from __future__ import annotations

import hashlib

import torch

from fastntk.rules import Block

HASH_BYTES = 256 * 2**20  # sketch: hashes kept between chunks (9 bytes a coordinate and pass)

# The sketch's hashes: coordinate c of parameter ``name`` in pass k goes to column h(c)
# with sign s(c), drawn by torch's CPU generator in segments of SEGMENT coordinates, each
# segment's generator seeded from (seed, name, k, segment). A block draws the segments it
# covers (kept for the next chunks while they fit in HASH_BYTES), so no hash per
# coordinate of every parameter and logit is held (that was O(K·P) memory), and the hashes
# do not depend on the blocks, the chunking or the device.
SEGMENT = 2**16


def segment_seed(seed: int, name: str, k: int, j: int) -> int:
    """The generator seed of segment ``j`` of parameter ``name``'s hashes in pass ``k``: a
    hash of all four (every int seed its own: a multiplicative mix truncated to 47 bits
    once made seeds 0 and 2**47 give the same sketch)."""
    digest = hashlib.blake2b(f"{seed}|{name}#{k}@{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


def segment(
    seed: int, name: str, k: int, j: int, numel: int, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns (int64) and signs (int8, ±1) of coordinates j·SEGMENT .. of one parameter."""
    g = torch.Generator().manual_seed(segment_seed(seed, name, k, j))
    n = min(SEGMENT, numel - j * SEGMENT)
    h = torch.randint(0, m, (n,), generator=g)
    sgn = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1
    return h, sgn


class Projection:
    """Adds the CountSketch of per-sample gradient blocks to the rows of ``S`` (N, m),
    drawing each block's hash segments, and keeping them for the next blocks and chunks
    while they fit in HASH_BYTES (9 bytes a coordinate: an int64 column, an int8 sign)."""

    def __init__(self, S: torch.Tensor, params: dict[str, torch.Tensor], seed: int):
        self.S, self.params, self.seed = S, params, seed
        self.kept: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.kept_bytes = 0

    def _segment(self, pname: str, k: int, j: int, numel: int) -> tuple[torch.Tensor, ...]:
        seg = self.kept.get((pname, k, j))
        if seg is None:
            m, device = self.S.shape[1], self.S.device
            seg = tuple(t.to(device) for t in segment(self.seed, pname, k, j, numel, m))
            if self.kept_bytes + 9 * seg[0].numel() <= HASH_BYTES:
                self.kept[(pname, k, j)] = seg
                self.kept_bytes += 9 * seg[0].numel()
        return seg

    def add(self, key: tuple[str, int, int], blk: Block, s0: int, s1: int) -> None:
        """S[s0:s1] += the sketch of block ``blk`` (samples s0:s1, the parameter rows from
        ``r0`` on of parameter ``pname`` in pass ``k``: ``key = (pname, r0, k)``)."""
        pname, r0, k = key
        G = blk.dense()
        p = self.params[pname]
        c0 = r0 * (p.numel() // (p.shape[0] if p.dim() else 1))
        c1 = c0 + G.shape[1]
        j0, j1 = c0 // SEGMENT, (c1 - 1) // SEGMENT
        segs = [self._segment(pname, k, j, p.numel()) for j in range(j0, j1 + 1)]
        a, b = c0 - j0 * SEGMENT, c1 - j0 * SEGMENT
        if len(segs) == 1:
            h, sgn = segs[0][0][a:b], segs[0][1][a:b]
        else:
            h = torch.cat([t[0] for t in segs])[a:b]
            sgn = torch.cat([t[1] for t in segs])[a:b]
        self.S[s0:s1].index_add_(1, h, G * sgn)
