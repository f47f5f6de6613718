"""A kernel on disk: ``out=PATH`` of :func:`fastntk.distributed.ntk`.

``PATH`` is a ``.npy`` file opened as a memory map by every rank, each writing its own
tiles, so no rank holds the kernel. Beside it, ``PATH.json`` (the manifest) records the
kernel's identity: a digest of the inputs, rank 0's parameters and buffers, the options,
the shape and the dtype; and each rank appends the key of every tile it finished to
``PATH.rank<r>.done``, after the tile's bytes are flushed to the file. A rerun of the same
call skips the tiles any log lists (whatever rank wrote them, with any number of ranks);
a tile a killed rank did not log is computed again. A path holding another kernel, or a
file fastntk did not write, is refused.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from fastntk.distributed.group import Group, collective
from fastntk.distributed.tiles import Tile
from fastntk.errors import DistributedError, OptionError

NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


class Store:
    def __init__(self, g: Group, path: str, shape: tuple[int, ...], dtype: torch.dtype, key: str):
        if dtype not in NUMPY:
            raise OptionError(f"out= writes float32 or float64 kernels, not {dtype}")
        self.g, self.path, self.shape, self.key = g, os.path.abspath(path), shape, key
        self.np_dtype = NUMPY[dtype]
        self.manifest = self.path + ".json"
        problem = self._create() if g.rank == 0 else None
        if g.world > 1:  # rank 0's verdict, on every rank
            box = [problem]
            with collective(f"opening out={path!r}"):
                dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem is not None:
            raise DistributedError(problem)
        self.mm = np.load(self.path, mmap_mode="r+")
        self.log = open(f"{self.path}.rank{g.rank}.done", "a")  # noqa: SIM115 - close()

    def _create(self) -> str | None:
        """Rank 0: create the file and its manifest, or check that they are this kernel's.
        Returns why not, or None."""
        want = {"key": self.key, "shape": list(self.shape), "dtype": np.dtype(self.np_dtype).name}
        if os.path.exists(self.manifest):
            with open(self.manifest) as f:
                have = json.load(f)
            if have != want:
                return (
                    f"out={self.path!r} holds another kernel (its manifest {self.manifest!r} "
                    "names other inputs, parameters, options or shape): choose another "
                    "path, or delete the file and its manifest to start over"
                )
            if not os.path.exists(self.path):
                return (
                    f"out={self.path!r} is missing, its manifest is not: delete {self.manifest!r}"
                )
            return None
        if os.path.exists(self.path):
            return (
                f"out={self.path!r} exists and is not a fastntk kernel (no manifest "
                f"{self.manifest!r}): fastntk does not overwrite it"
            )
        for stale in glob.glob(glob.escape(self.path) + ".rank*.done"):
            os.remove(stale)  # (logs of a kernel deleted without them)
        mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.np_dtype, shape=self.shape)
        mm.flush()
        del mm
        tmp = self.manifest + ".tmp"
        with open(tmp, "w") as f:
            json.dump(want, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest)
        return None

    def done(self) -> set[str]:
        """The keys of the tiles finished so far, by any rank of any run."""
        keys: set[str] = set()
        for log in glob.glob(glob.escape(self.path) + ".rank*.done"):
            with open(log) as f:
                keys.update(line.strip() for line in f if line.strip())
        return keys

    def write(self, tile: Tile, block: torch.Tensor, symmetric: bool) -> None:
        """Tile ``tile`` of the kernel (and its mirror where ``symmetric``), then its key."""
        b = block.detach().cpu().numpy()
        self.mm[tile.r0 : tile.r1, tile.c0 : tile.c1] = b
        if symmetric and tile.r0 != tile.c0:
            self.mm[tile.c0 : tile.c1, tile.r0 : tile.r1] = (
                b.transpose(1, 0, 3, 2) if b.ndim == 4 else b.T
            )
        self.mm.flush()
        self.log.write(tile.key + "\n")
        self.log.flush()
        os.fsync(self.log.fileno())

    def load(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.mm))

    def close(self) -> None:
        self.log.close()
        del self.mm
