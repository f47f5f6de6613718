"""NAS-Bench-201 as a :class:`fastntk.spaces.base.SearchSpace`: :class:`NB201Space`."""

from __future__ import annotations

import random

import torch.nn as nn

from fastntk.spaces.nb201.grammar import (
    EDGES,
    NUM_ARCHS,
    OPS,
    as_arch,
    canonical,
    format_arch,
    parse_arch,
    unique_str,
    validate_arch,
)
from fastntk.spaces.nb201.model import build_model
from fastntk.spaces.nb201.supernet import (
    SUPER_SEP,
    build_supernet,
    format_supernet,
    parse_supernet,
)
from fastntk.spaces.nb201.table import accuracy, all_archs, percentile, rank

__all__ = ["NB201Space"]


class NB201Space:
    """NAS-Bench-201 as a :class:`fastntk.spaces.base.SearchSpace`.

    Architectures are arch strings. ``C`` and ``N`` set the width and depth of
    the networks :meth:`build` returns (benchmark values: 16 and 5).
    """

    name = "nb201"

    def __init__(self, C: int = 16, N: int = 5):
        self.C = C
        self.N = N

    def __repr__(self) -> str:
        return f"NB201Space(C={self.C}, N={self.N})"

    def __len__(self) -> int:
        return NUM_ARCHS

    def sample(self, rng: random.Random) -> str:
        """One arch drawn uniformly from the 15,625 (one ``rng.randrange`` per edge)."""
        return format_arch([OPS[rng.randrange(len(OPS))] for _ in EDGES])

    def mutate(self, arch: str, rng: random.Random) -> str:
        """``arch`` with exactly one edge (uniform) changed to a different op (uniform)."""
        ops = list(parse_arch(as_arch(arch)))
        e = rng.randrange(len(EDGES))
        choices = [op for op in OPS if op != ops[e]]
        ops[e] = choices[rng.randrange(len(choices))]
        return format_arch(ops)

    def build(self, arch: str, num_classes: int = 10) -> nn.Module:
        if isinstance(arch, str) and SUPER_SEP in arch:
            return build_supernet(arch, num_classes=num_classes, C=self.C, N=self.N)
        return build_model(arch, num_classes=num_classes, C=self.C, N=self.N)

    @staticmethod
    def feature_blocks(model: nn.Module) -> tuple[list[nn.Module], int]:
        """The blocks :func:`fastntk.metrics.feature_entropy` measures: the stem and every
        cell (the residual reductions too), (N, C, H, W) outputs: channel dimension 1."""
        return [model.stem, *model.cells], 1

    def encode(self, arch: str) -> str:
        if isinstance(arch, str) and SUPER_SEP in arch:
            return format_supernet(parse_supernet(arch))
        return as_arch(arch)

    def decode(self, s: str) -> str:
        if isinstance(s, str) and SUPER_SEP in s:
            return format_supernet(parse_supernet(s))
        return validate_arch(s)

    #: ops that TE-NAS prunes before its first round (its ``alpha[:, none] = -inf``): a
    #: pruned NB201 architecture never contains ``none``.
    supernet_excluded: tuple[str, ...] = ("none",)

    def supernet(self, ops_per_edge) -> str:
        """Encoding of the supernet with these candidate ops per edge (for pruning)."""
        return format_supernet(ops_per_edge)

    def full_supernet(self) -> str:
        """The supernet every pruning round starts from: every op but
        :attr:`supernet_excluded` on every edge."""
        return format_supernet([[o for o in OPS if o not in self.supernet_excluded]] * len(EDGES))

    def all(self) -> list[str]:
        """All archs in benchmark index order."""
        return all_archs()

    # Thin method wrappers over the module functions.
    @staticmethod
    def canonical(arch: str) -> str:
        return canonical(arch)

    @staticmethod
    def unique_str(arch: str) -> str:
        return unique_str(arch)

    @staticmethod
    def accuracy(arch: str, dataset: str = "cifar10") -> float:
        return accuracy(arch, dataset)

    @staticmethod
    def rank(arch: str, dataset: str = "cifar10") -> int:
        return rank(arch, dataset)

    @staticmethod
    def percentile(arch: str, dataset: str = "cifar10") -> float:
        return percentile(arch, dataset)
