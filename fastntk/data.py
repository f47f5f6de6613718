"""Data bundled with fastntk: a real CIFAR-10 sample, and seeded synthetic images.

The sample (``fastntk/data/cifar10_1000.npz``) holds 1,000 CIFAR-10 training
images, 100 per class; its provenance is in ``fastntk/data/PROVENANCE.md``.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import torch

from fastntk._args import integer
from fastntk.errors import InputError, OptionError

# Per-channel statistics of the CIFAR-10 training set (the values every
# CIFAR-10 codebase uses, NAS-Bench-201's included).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@functools.lru_cache(maxsize=1)
def _cifar10_arrays() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("fastntk").joinpath("data/cifar10_1000.npz").open("rb") as f:
        d = np.load(f)
        return d["x"], d["y"]


def cifar10_size() -> int:
    """Number of images in the bundled CIFAR-10 sample."""
    return len(_cifar10_arrays()[1])


def load_cifar10(
    n: int | None = None, *, seed: int = 0, offset: int = 0, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``n`` images of the bundled CIFAR-10 sample.

    The images are taken in a fixed permutation of the sample drawn with
    ``seed``; ``offset`` skips the first images of that permutation, so
    ``load_cifar10(256, seed=s)`` and ``load_cifar10(256, seed=s, offset=256)``
    are disjoint (a train and a test split).

    Args:
        n: number of images (default: all remaining after ``offset``).
        seed: seed of the permutation.
        offset: start position in the permutation.
        normalize: subtract the CIFAR-10 mean and divide by the std per channel.

    Returns:
        ``x``: (n, 3, 32, 32) float32 and ``y``: (n,) int64 labels 0..9.
    """
    xs, ys = _cifar10_arrays()
    total = len(ys)
    if n is None:
        n = total - offset
    if n <= 0 or offset < 0 or offset + n > total:
        raise InputError(
            f"asked for {n} CIFAR-10 images from offset {offset}, but the bundled sample "
            f"holds {total}; use n + offset <= {total} (or --data synthetic for more)"
        )
    perm = np.random.default_rng(integer(seed, "seed", 0, 2**63)).permutation(total)[
        offset : offset + n
    ]
    x = torch.from_numpy(xs[perm].astype(np.float32) / 255.0)
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x, torch.from_numpy(ys[perm].astype(np.int64))


def synthetic(
    n: int, *, seed: int = 0, shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded standard-normal images and uniform labels (for tests and scale runs)."""
    if n <= 0:
        raise InputError(f"n must be positive, got {n}")
    g = torch.Generator().manual_seed(integer(seed, "seed", 0, 2**63))
    x = torch.randn((n, *shape), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def load(name: str, n: int, *, seed: int = 0, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``n`` samples of the data set ``name`` (``"cifar10"`` or ``"synthetic"``)."""
    if name == "cifar10":
        return load_cifar10(n, seed=seed, offset=offset)
    if name == "synthetic":
        return synthetic(n, seed=seed + offset)
    raise OptionError(f"unknown data set {name!r}; choose 'cifar10' or 'synthetic'")
