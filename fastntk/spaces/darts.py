"""The DARTS search space (Liu et al., 2019), CIFAR network.

An architecture is a *genotype*: a normal cell and a reduction cell, each with
four intermediate nodes; node ``i`` (``i = 0..3``, graph nodes 2..5) sums two
operations applied to two *distinct* earlier nodes (``0`` = output of the cell before
the previous one, ``1`` = previous cell, ``2 + m`` = intermediate node ``m``; DARTS
keeps "the top-k strongest operations from distinct nodes", its ``genotype()`` the two
best of ``range(i + 2)``), and the cell outputs the concatenation of its four
intermediate nodes.

Its canonical string (the journal key) is::

    normal=op~in,op~in|op~in,op~in|op~in,op~in|op~in,op~in;reduce=...

e.g. ``normal=sep_conv_3x3~0,sep_conv_3x3~1|...``; the two inputs of a node are
sorted (the node sums them, so their order does not matter), which makes the
encoding canonical. :meth:`DartsSpace.decode` accepts any order and any
whitespace-free spelling of that form.

In Python an architecture is a ``Genotype``: ``(normal, reduce)``, each a tuple
of 4 nodes, each node a sorted tuple of two ``(op, input)`` pairs.

The network is DARTS' ``NetworkCIFAR`` without the auxiliary head and drop
path; ``C`` and ``layers`` default to a small size (16, 8) so that NTK scoring
stays cheap on a CPU (DARTS' evaluation network is 36, 20).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn as nn

from fastntk._args import is_int
from fastntk.errors import ArchitectureError
from fastntk.spaces.base import ChoiceSpace, positive_int

__all__ = ["OPS", "DartsSpace", "Genotype", "NetworkCIFAR", "DARTS_V2", "build_model"]

OPS: tuple[str, ...] = (
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
"""Candidate operations (DARTS' PRIMITIVES without ``none``, which no final genotype uses)."""

NUM_NODES = 4
CELLS = ("normal", "reduce")

Node = tuple[tuple[str, int], tuple[str, int]]
CellGenotype = tuple[Node, Node, Node, Node]
Genotype = tuple[CellGenotype, CellGenotype]

DARTS_V2 = (
    "normal=sep_conv_3x3~0,sep_conv_3x3~1|sep_conv_3x3~0,sep_conv_3x3~1|"
    "sep_conv_3x3~1,skip_connect~0|dil_conv_3x3~2,skip_connect~0;"
    "reduce=max_pool_3x3~0,max_pool_3x3~1|max_pool_3x3~1,skip_connect~2|"
    "max_pool_3x3~0,skip_connect~2|max_pool_3x3~1,skip_connect~2"
)
"""The DARTS (second order) genotype of the paper, in this module's encoding."""


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def _canon_node(pairs: Sequence[tuple[str, int]]) -> Node:
    a, b = sorted((str(op), int(i)) for op, i in pairs)
    return (a, b)


def _check_cell(cell: Sequence[Sequence[tuple[str, int]]], kind: str) -> CellGenotype:
    form = f"a sequence of {NUM_NODES} nodes, each two (op, input) pairs"
    if isinstance(cell, str) or not isinstance(cell, Sequence) or len(cell) != NUM_NODES:
        raise ArchitectureError(f"{kind} cell must be {form}, got {cell!r}")
    nodes = []
    for m, node in enumerate(cell):
        if isinstance(node, str) or not isinstance(node, Sequence) or len(node) != 2:
            raise ArchitectureError(f"{kind} node {m} must be two (op, input) pairs, got {node!r}")
        pairs = []
        for pair in node:
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ArchitectureError(
                    f"{kind} node {m}: each input is an (op, input index) pair, got {pair!r}"
                )
            op, i = pair
            if op not in OPS:
                raise ArchitectureError(
                    f"unknown op {op!r} in {kind} node {m}; allowed ops: {', '.join(OPS)}"
                )
            if not is_int(i):
                raise ArchitectureError(
                    f"input {i!r} of {kind} node {m} must be an integer node index, got "
                    f"{type(i).__name__}"
                )
            i = int(i.__index__())  # (numpy integers too)
            if not 0 <= i < m + 2:
                raise ArchitectureError(
                    f"input {i!r} of {kind} node {m} must be an earlier node in 0..{m + 1}"
                )
            pairs.append((op, i))
        node = pairs
        if node[0][1] == node[1][1]:
            raise ArchitectureError(
                f"{kind} node {m} takes both its inputs from node {node[0][1]}; a DARTS node "
                "sums two operations on two distinct earlier nodes"
            )
        nodes.append(_canon_node(node))
    return tuple(nodes)  # type: ignore[return-value]


def validate(arch: Sequence) -> Genotype:
    """Canonical :data:`Genotype` of ``arch`` (checks ops and inputs)."""
    if isinstance(arch, str):
        return decode(arch)
    try:
        normal, reduce = arch
    except (TypeError, ValueError):
        raise ArchitectureError(f"a DARTS genotype is (normal, reduce), got {arch!r}") from None
    return (_check_cell(normal, "normal"), _check_cell(reduce, "reduce"))


def encode(arch: Sequence) -> str:
    """Canonical string of a genotype (see the module docstring)."""
    g = validate(arch)
    parts = []
    for kind, cell in zip(CELLS, g, strict=True):
        nodes = "|".join(",".join(f"{op}~{i}" for op, i in node) for node in cell)
        parts.append(f"{kind}={nodes}")
    return ";".join(parts)


def decode(s: str) -> Genotype:
    """Genotype of string ``s``; :class:`ArchitectureError` says what is wrong."""
    if not isinstance(s, str) or not s:
        raise ArchitectureError(f"a DARTS arch must be a non-empty string, got {s!r}")
    cells: dict[str, list] = {}
    for part in s.split(";"):
        kind, eq, body = part.partition("=")
        if not eq or kind not in CELLS:
            raise ArchitectureError(
                f"DARTS arch part {part!r} must be 'normal=...' or 'reduce=...', in {s!r}"
            )
        if kind in cells:
            raise ArchitectureError(f"DARTS arch gives the {kind} cell twice: {s!r}")
        nodes = []
        for node in body.split("|"):
            pairs = []
            for edge in node.split(","):
                op, tilde, src = edge.partition("~")
                if not tilde or not (src.isascii() and src.isdigit()):
                    raise ArchitectureError(
                        f"DARTS edge {edge!r} must have the form 'op~input', in {s!r}"
                    )
                pairs.append((op, int(src)))
            nodes.append(pairs)
        cells[kind] = nodes
    if set(cells) != set(CELLS):
        raise ArchitectureError(f"DARTS arch needs both 'normal=' and 'reduce=' cells: {s!r}")
    return validate((cells["normal"], cells["reduce"]))


# ---------------------------------------------------------------------------
# Operations and network (DARTS' NetworkCIFAR)
# ---------------------------------------------------------------------------


class ReLUConvBN(nn.Sequential):
    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise (dilated) conv -> pointwise conv -> BN."""

    def __init__(self, C_in, C_out, kernel, stride, padding, dilation):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                C_in, C_in, kernel, stride, padding, dilation=dilation, groups=C_in, bias=False
            ),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out),
        )


class SepConv(nn.Sequential):
    """Two stacked DilConv(dilation=1), the first one strided."""

    def __init__(self, C_in, C_out, kernel, stride, padding):
        super().__init__(
            DilConv(C_in, C_in, kernel, stride, padding, 1),
            DilConv(C_in, C_out, kernel, 1, padding, 1),
        )


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FactorizedReduce(nn.Module):
    """Stride-2 1x1 convs on two offset grids, concatenated (halves H and W)."""

    def __init__(self, C_in: int, C_out: int):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out - C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def _make_op(name: str, C: int, stride: int) -> nn.Module:
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(C, C)
    if name == "sep_conv_3x3":
        return SepConv(C, C, 3, stride, 1)
    if name == "sep_conv_5x5":
        return SepConv(C, C, 5, stride, 2)
    if name == "dil_conv_3x3":
        return DilConv(C, C, 3, stride, 2, 2)
    if name == "dil_conv_5x5":
        return DilConv(C, C, 5, stride, 4, 2)
    raise ArchitectureError(f"unknown DARTS op {name!r}")


class Cell(nn.Module):
    def __init__(
        self, cell: CellGenotype, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool
    ):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = (
            FactorizedReduce(C_pp, C) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0)
        )
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0)
        self.ops = nn.ModuleList()
        self.indices: list[int] = []
        for node in cell:
            for op, i in node:
                stride = 2 if reduction and i < 2 else 1
                self.ops.append(_make_op(op, C, stride))
                self.indices.append(i)
        self.multiplier = NUM_NODES

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for m in range(NUM_NODES):
            a, b = 2 * m, 2 * m + 1
            h = self.ops[a](states[self.indices[a]]) + self.ops[b](states[self.indices[b]])
            states.append(h)
        return torch.cat(states[2:], dim=1)


class NetworkCIFAR(nn.Module):
    """DARTS' CIFAR network (no auxiliary head, no drop path); forward returns logits.

    Args:
        genotype: a :data:`Genotype` or its string.
        C: initial channels; layers: number of cells (reductions at 1/3 and 2/3).

    ``x: (N, 3, H, W)`` -> logits ``(N, num_classes)``.
    """

    def __init__(self, genotype, num_classes: int = 10, C: int = 16, layers: int = 8):
        super().__init__()
        g = validate(genotype)
        stem_mult = 3
        C_curr = stem_mult * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr)
        )
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = Cell(g[1] if reduction else g[0], C_pp, C_p, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            C_pp, C_p = C_p, cell.multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.global_pooling(s1).flatten(1))


def build_model(arch, num_classes: int = 10, C: int = 16, layers: int = 8) -> NetworkCIFAR:
    """The network of ``arch`` (genotype or string); see :class:`NetworkCIFAR`."""
    return NetworkCIFAR(arch, num_classes=positive_int("num_classes", num_classes),
                        C=positive_int("C", C), layers=positive_int("layers", layers))  # fmt: skip


# ---------------------------------------------------------------------------
# The space
# ---------------------------------------------------------------------------


class DartsSpace(ChoiceSpace):
    """DARTS as a :class:`fastntk.spaces.base.SearchSpace`; archs are :data:`Genotype` tuples.

    It also exposes its categorical decisions (``decisions``, ``to_choices``,
    ``from_choices``) for pruning and REINFORCE: per cell and node, three: which two
    distinct earlier nodes it takes (``inputs``, a pair ``i < j``), and the op on each
    (``op_lo`` on ``i``, ``op_hi`` on ``j``). Every combination is a genotype and every
    genotype one combination, so ``sample`` is uniform over genotypes.
    """

    name = "darts"

    def __init__(self, C: int = 16, layers: int = 8):
        self.C = C
        self.layers = layers

    def __repr__(self) -> str:
        return f"DartsSpace(C={self.C}, layers={self.layers})"

    def decisions(self) -> list[tuple[str, tuple]]:
        out = []
        for kind in CELLS:
            for m in range(NUM_NODES):
                pairs = tuple((i, j) for j in range(m + 2) for i in range(j))
                out += [(f"{kind}.{m}.inputs", pairs), (f"{kind}.{m}.op_lo", OPS),
                        (f"{kind}.{m}.op_hi", OPS)]  # fmt: skip
        return out

    def to_choices(self, arch) -> tuple:
        out: list = []
        for cell in validate(arch):
            for node in cell:
                lo, hi = sorted(node, key=lambda pair: pair[1])
                out += [(lo[1], hi[1]), lo[0], hi[0]]
        return tuple(out)

    def from_choices(self, choices: Sequence) -> Genotype:
        c = list(choices)
        if len(c) != 3 * NUM_NODES * len(CELLS):
            raise ArchitectureError(
                f"a DARTS genotype has {3 * NUM_NODES * len(CELLS)} decisions, got {len(c)}"
            )
        cells = []
        for k in range(len(CELLS)):
            nodes = []
            for m in range(NUM_NODES):
                (i, j), op_lo, op_hi = c[3 * (NUM_NODES * k + m) : 3 * (NUM_NODES * k + m) + 3]
                nodes.append(((op_lo, i), (op_hi, j)))
            cells.append(nodes)
        return validate(cells)

    def mutate(self, arch, rng: random.Random) -> Genotype:
        """Change one (op, input) pair: its op, or its input to another earlier node that
        the node's other pair does not use (uniformly among those; node 0 has no other
        input to move to, so its pairs change op)."""
        g = validate(arch)
        cells = [[list(node) for node in cell] for cell in g]
        k, m, slot = rng.randrange(len(CELLS)), rng.randrange(NUM_NODES), rng.randrange(2)
        op, i = cells[k][m][slot]
        other = cells[k][m][1 - slot][1]
        inputs = [j for j in range(m + 2) if j not in (i, other)]
        if inputs and rng.random() < 0.5:
            i = rng.choice(inputs)
        else:
            op = rng.choice([o for o in OPS if o != op])
        cells[k][m][slot] = (op, i)
        return validate(cells)

    def build(self, arch, num_classes: int = 10) -> nn.Module:
        return build_model(arch, num_classes=num_classes, C=self.C, layers=self.layers)

    @staticmethod
    def feature_blocks(model: nn.Module) -> tuple[list[nn.Module], int]:
        """The blocks :func:`fastntk.metrics.feature_entropy` measures: the stem and every
        cell, (N, C, H, W) outputs: channel dimension 1."""
        return [model.stem, *model.cells], 1

    def encode(self, arch) -> str:
        return encode(arch)

    def decode(self, s: str) -> Genotype:
        return decode(s)
