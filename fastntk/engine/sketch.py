"""The sketch's hashes (:func:`fastntk.ntk_sketch`)."""

from __future__ import annotations

import hashlib

import torch

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
