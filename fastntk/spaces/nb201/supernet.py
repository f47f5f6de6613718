"""NAS-Bench-201 supernets (TE-NAS-style pruning): every edge averages a set of candidate ops.

A supernet string is an arch string whose edges may list several ops joined by
:data:`SUPER_SEP`, in :data:`~fastntk.spaces.nb201.grammar.OPS` order::

    |nor_conv_1x1&nor_conv_3x3~0|+|skip_connect~0|avg_pool_3x3~1|+|...|

A plain arch string is the supernet with one op per edge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn as nn

from fastntk.errors import ArchitectureError
from fastntk.spaces.nb201.grammar import EDGES, NUM_NODES, OPS, validate_arch
from fastntk.spaces.nb201.model import InferCell, TinyNetwork, make_op

__all__ = [
    "SUPER_SEP",
    "MixedOp",
    "SuperCell",
    "build_supernet",
    "format_supernet",
    "parse_supernet",
]

SUPER_SEP = "&"
"""Joins the candidate ops of one supernet edge."""


def format_supernet(ops_per_edge: Iterable[str | Iterable[str]]) -> str:
    """``[[op, ...] x 6 edges]`` -> ``|op&op~0|+|op~0|op&op~1|+|...|`` (ops in OPS order)."""
    try:
        ops_per_edge = [(e,) if isinstance(e, str) else tuple(e) for e in ops_per_edge]
    except TypeError:
        raise ArchitectureError(
            f"a supernet is a list of {len(EDGES)} edges, each a list of ops, got {ops_per_edge!r}"
        ) from None
    if len(ops_per_edge) != len(EDGES):
        raise ArchitectureError(f"a supernet needs {len(EDGES)} edges, got {len(ops_per_edge)}")
    parts = []
    for ops in ops_per_edge:
        bad = [o for o in ops if o not in OPS]
        if not ops or bad:
            raise ArchitectureError(f"supernet edge ops {ops!r}: each edge needs ops from {OPS}")
        parts.append(SUPER_SEP.join(o for o in OPS if o in ops))
    groups, e = [], 0
    for j in range(1, NUM_NODES):
        groups.append("|" + "|".join(f"{parts[e + k]}~{k}" for k in range(j)) + "|")
        e += j
    return "+".join(groups)


def parse_supernet(s: str) -> list[tuple[str, ...]]:
    """Inverse of :func:`format_supernet` (a plain arch string is a one-op-per-edge supernet)."""
    if not isinstance(s, str):
        raise ArchitectureError(f"a supernet string is a str, got {type(s).__name__}")
    # Structure (node groups, "~source" indices) is validated on the one-op arch string
    # that keeps each edge's first op; then every op of every edge is checked.
    validate_arch(re.sub(r"\|([^|~]+)~", lambda m: "|" + m.group(1).split(SUPER_SEP)[0] + "~", s))
    edges = [
        tuple(tok.rsplit("~", 1)[0].split(SUPER_SEP))
        for group in s.split("+")
        for tok in group.strip("|").split("|")
    ]
    if len(edges) != len(EDGES) or any(o not in OPS for ops in edges for o in ops):
        raise ArchitectureError(f"malformed supernet string {s!r}; ops must come from {OPS}")
    for k, ops in enumerate(edges):
        if len(set(ops)) != len(ops):
            raise ArchitectureError(f"edge {k} of supernet {s!r} lists an op twice: {ops}")
    return edges


class MixedOp(nn.Module):
    """The mean of several candidate ops on one supernet edge: TE-NAS weights each op
    still alive by softmax(α) with α = 0 for all of them (the pruned at -inf), 1/k each.

    The ops are held by name (``ops["nor_conv_3x3"]``), so a supernet with some ops
    removed takes the remaining ones' weights from a fuller one by ``load_state_dict``
    (TE-NAS scores every pruned supernet with the original's weights)."""

    def __init__(self, ops: Iterable[str], C_in: int, C_out: int, stride: int):
        super().__init__()
        self.names = tuple(ops)
        self.ops = nn.ModuleDict({op: make_op(op, C_in, C_out, stride) for op in ops})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = list(self.ops.values())
        out = ops[0](x)
        for op in ops[1:]:
            out = out + op(x)
        return out / len(ops) if len(ops) > 1 else out


class SuperCell(InferCell):
    """A cell whose edges are :class:`MixedOp` means (TE-NAS's pruning supernet)."""

    def __init__(self, arch: str, C_in: int, C_out: int, stride: int = 1):
        nn.Module.__init__(self)
        self.arch = arch
        self.layers = nn.ModuleList()
        for (_j, k), ops in zip(EDGES, parse_supernet(arch), strict=True):
            cin, st = (C_in, stride) if k == 0 else (C_out, 1)
            self.layers.append(MixedOp(ops, cin, C_out, st))
        self.in_dim = C_in
        self.out_dim = C_out


def build_supernet(
    ops_per_edge: str | Iterable[str | Iterable[str]],
    num_classes: int = 10,
    C: int = 16,
    N: int = 5,
) -> nn.Module:
    """The NB201 network whose cells average, on every edge, the given candidate ops.

    Args:
        ops_per_edge: a supernet string, or the ops of each of the six edges.
    """
    arch = ops_per_edge if isinstance(ops_per_edge, str) else format_supernet(ops_per_edge)
    parse_supernet(arch)
    return TinyNetwork(arch, C=C, N=N, num_classes=num_classes, cell=SuperCell)
