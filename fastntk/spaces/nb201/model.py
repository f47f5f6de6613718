"""NAS-Bench-201 (NATS-Bench topology) search space.

An architecture is a cell on 4 nodes; every edge ``k -> j`` (``k < j``) carries
one of five operations. Its string form is::

    |op~0|+|op~0|op~1|+|op~0|op~1|op~2|

where group ``j`` (``j = 1, 2, 3``) lists the edges into node ``j`` and ``~k``
is the source node. Node ``j`` is the sum of ``op(node k)`` over its edges and
the cell outputs node 3.

This module provides

* parsing / formatting / validation of arch strings (:func:`parse_arch`,
  :func:`format_arch`, :func:`validate_arch`, :func:`all_archs`);
* the isomorphism classes of the benchmark (:func:`unique_str`,
  :func:`canonical`): 15,625 archs fall into 6,466 classes;
* the bundled ground truth (200-epoch test accuracies on CIFAR-10, CIFAR-100
  and ImageNet16-120; :func:`load_table`, :func:`accuracy`, :func:`rank`,
  :func:`percentile`);
* :func:`build_model`, a network whose ``state_dict`` matches the official
  NAS-Bench-201 ``TinyNetwork`` key for key, shape for shape;
* :class:`NB201Space`, the :class:`fastntk.spaces.base.SearchSpace`
  implementation.

The table is read lazily (first call of a function that needs it), so
importing this module costs nothing beyond torch and numpy.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastntk.errors import ArchitectureError, OptionError
from fastntk.spaces.base import positive_int

__all__ = [
    "DATASETS",
    "EDGES",
    "NUM_ARCHS",
    "NUM_UNIQUE",
    "OPS",
    "NB201Space",
    "NB201Table",
    "accuracy",
    "all_archs",
    "build_model",
    "canonical",
    "format_arch",
    "load_table",
    "parse_arch",
    "percentile",
    "rank",
    "unique_str",
    "validate_arch",
]

OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
"""The five candidate operations, in NAS-Bench-201's order."""

EDGES: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
"""The six edges as ``(target, source)``, in arch-string (and ``layers``) order."""

NUM_NODES = 4
NUM_ARCHS = len(OPS) ** len(EDGES)  # 15,625
NUM_UNIQUE = 6466

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "imagenet16-120")
"""Dataset names accepted by :func:`accuracy`, :func:`rank` and :func:`percentile`."""

_COLUMNS = {
    "cifar10": "CIFAR10TestAccuracy200Epochs",
    "cifar100": "CIFAR100TestAccuracy200Epochs",
    "imagenet16-120": "ImageNetTestAccuracy200Epochs",
}
_DATASET_ALIASES = {
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "imagenet16-120": "imagenet16-120",
    "imagenet16_120": "imagenet16-120",
    "imagenet": "imagenet16-120",
    "imagenet16": "imagenet16-120",
}

_TABLE_FILE = "nb201_accuracy.csv.gz"
_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "data"

ArchLike = str | Sequence[str]


# ---------------------------------------------------------------------------
# Arch strings
# ---------------------------------------------------------------------------


def format_arch(ops: Sequence[str]) -> str:
    """Arch string of six op names given in edge order (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2)."""
    if isinstance(ops, str) or not isinstance(ops, Sequence):
        raise ArchitectureError(
            f"format_arch expects a sequence of {len(EDGES)} op names, got {type(ops).__name__}"
        )
    ops = tuple(ops)
    if len(ops) != len(EDGES):
        raise ArchitectureError(f"expected {len(EDGES)} op names (one per edge), got {len(ops)}")
    for i, op in enumerate(ops):
        if op not in OPS:
            j, k = EDGES[i]
            raise ArchitectureError(
                f"unknown op {op!r} on edge {i} ({k}->{j}); allowed ops: {', '.join(OPS)}"
            )
    return f"|{ops[0]}~0|+|{ops[1]}~0|{ops[2]}~1|+|{ops[3]}~0|{ops[4]}~1|{ops[5]}~2|"


def parse_arch(s: str) -> tuple[str, ...]:
    """The six op names of arch string ``s``, in edge order.

    Raises:
        ArchitectureError: if ``s`` is malformed; the message says what is wrong.
    """
    if not isinstance(s, str):
        raise ArchitectureError(
            f"an NB201 arch string must be a str, got {type(s).__name__}: {s!r}"
        )
    if not s:
        raise ArchitectureError("empty NB201 arch string; expected '|op~0|+|op~0|op~1|+|...|'")
    if s != s.strip():
        raise ArchitectureError(f"NB201 arch string has leading/trailing whitespace: {s!r}")
    groups = s.split("+")
    if len(groups) != NUM_NODES - 1:
        raise ArchitectureError(
            f"expected {NUM_NODES - 1} node groups separated by '+' (nodes 1, 2, 3), "
            f"got {len(groups)} in {s!r}"
        )
    ops: list[str] = []
    for j, group in enumerate(groups, start=1):
        if len(group) < 2 or not group.startswith("|") or not group.endswith("|"):
            raise ArchitectureError(
                f"node {j} group {group!r} must start and end with '|' "
                f"(e.g. '|nor_conv_3x3~0|'), in {s!r}"
            )
        edges = group[1:-1].split("|")
        if len(edges) != j:
            raise ArchitectureError(
                f"node {j} must have exactly {j} incoming edge(s) (from nodes "
                f"{', '.join(str(k) for k in range(j))}), got {len(edges)} in group {group!r}"
            )
        for k, edge in enumerate(edges):
            if edge.count("~") != 1:
                raise ArchitectureError(
                    f"edge {edge!r} of node {j} must have the form 'op~source' "
                    f"(exactly one '~'), in {s!r}"
                )
            op, src = edge.split("~")
            if op not in OPS:
                raise ArchitectureError(
                    f"unknown op {op!r} on edge {k}->{j}; allowed ops: {', '.join(OPS)}"
                )
            if not src.isdigit() or not src.isascii():
                raise ArchitectureError(
                    f"source of edge {edge!r} of node {j} must be a node index, got {src!r}"
                )
            if int(src) != k or src != str(k):
                raise ArchitectureError(
                    f"edge {k + 1} of node {j} ({edge!r}) must come from node {k} "
                    f"('~{k}'), got source '~{src}'; edges into node j are listed "
                    f"in source order 0..j-1"
                )
            ops.append(op)
    return tuple(ops)


def validate_arch(s: str) -> str:
    """Check that ``s`` is a well-formed NB201 arch string and return it unchanged.

    Raises:
        ArchitectureError: naming the first problem found (bad op and the allowed
            ones, wrong number of node groups or edges, wrong source index,
            missing ``|`` ...).
    """
    parse_arch(s)
    return s


def _as_arch(arch: ArchLike) -> str:
    """Validated arch string from a string or a sequence of six op names."""
    if isinstance(arch, str):
        if arch in _arch_index():  # fast path for the 15,625 canonical spellings
            return arch
        parse_arch(arch)
        return arch  # pragma: no cover - every valid string is in the index
    if isinstance(arch, Sequence):
        return format_arch(arch)
    raise ArchitectureError(
        f"an NB201 architecture must be an arch string or 6 op names, got {type(arch).__name__}"
    )


def _product_archs() -> list[str]:
    return [format_arch(ops) for ops in itertools.product(OPS, repeat=len(EDGES))]


@functools.lru_cache(maxsize=1)
def _arch_index() -> dict[str, int]:
    # Built from the enumeration, not the table, so validation never reads the file.
    return {a: i for i, a in enumerate(_product_archs())}


def all_archs() -> list[str]:
    """All 15,625 arch strings in NAS-Bench-201 benchmark index order.

    The benchmark order is not an enumeration order (index 0 is
    ``|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|...``),
    so it is read from the bundled table. Returns a new list each call.
    """
    return list(load_table().archs)


# ---------------------------------------------------------------------------
# Isomorphism
# ---------------------------------------------------------------------------


def unique_str(arch: ArchLike) -> str:
    """NAS-Bench-201's isomorphism key of ``arch`` (the table's ``UniqueString``).

    This is the official ``Structure.to_unique_str(consider_zero=True)``:
    node 0 is ``"0"``; each edge ``k -> j`` becomes ``"#"`` if its op is
    ``none`` or node ``k`` is exactly ``"#"``, node ``k``'s string itself if
    its op is ``skip_connect``, and ``"(" + node_k + ")@" + op`` otherwise;
    node ``j`` is its edge terms sorted and joined with ``"+"``; the key is
    node 3's string. Two archs are isomorphic iff their keys are equal.
    """
    ops = parse_arch(_as_arch(arch))
    nodes = ["0"]
    e = 0
    for j in range(1, NUM_NODES):
        terms = []
        for k in range(j):
            op = ops[e]
            e += 1
            src = nodes[k]
            if op == "none" or src == "#":
                terms.append("#")
            elif op == "skip_connect":
                terms.append(src)
            else:
                terms.append(f"({src})@{op}")
        nodes.append("+".join(sorted(terms)))
    return nodes[-1]


@functools.lru_cache(maxsize=1)
def _canonical_map() -> dict[str, str]:
    # Representative of each class: its first member in op-index order
    # (itertools.product over OPS), i.e. the member that prefers 'none', then
    # 'skip_connect', ... edge by edge. Independent of the table.
    rep: dict[str, str] = {}
    out: dict[str, str] = {}
    for a in _product_archs():
        key = unique_str(a)
        out[a] = rep.setdefault(key, a)
    return out


def canonical(arch: ArchLike) -> str:
    """Canonical representative (an arch string) of ``arch``'s isomorphism class.

    ``canonical(a) == canonical(b)`` iff ``unique_str(a) == unique_str(b)``;
    there are 6,466 distinct values over the 15,625 archs. The representative
    is the class member that comes first when the op tuples are enumerated in
    :data:`OPS` order (so it prefers ``none`` and ``skip_connect`` edges, and
    tends to be the member with the fewest parameters). It is itself a valid
    arch string, so it can be built, looked up in the table, and used as a
    journal key to skip evaluating isomorphic duplicates.
    """
    return _canonical_map()[_as_arch(arch)]


# ---------------------------------------------------------------------------
# Ground-truth table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NB201Table:
    """The bundled NAS-Bench-201 table (benchmark index order).

    Attributes:
        archs: the 15,625 arch strings.
        unique: the ``UniqueString`` of each arch.
        acc: dataset name -> float64 array of 200-epoch test accuracies (%).
        index: arch string -> row index.
    """

    archs: tuple[str, ...]
    unique: tuple[str, ...]
    acc: dict[str, np.ndarray]
    index: dict[str, int]

    def __len__(self) -> int:
        return len(self.archs)

    def record(self, arch: ArchLike) -> dict[str, object]:
        """One row as a dict: arch, unique, and one accuracy per dataset."""
        i = self.index[_as_arch(arch)]
        rec: dict[str, object] = {"index": i, "arch": self.archs[i], "unique": self.unique[i]}
        for d in DATASETS:
            rec[d] = float(self.acc[d][i])
        return rec


@functools.lru_cache(maxsize=1)
def load_table() -> NB201Table:
    """Read the bundled ``nb201_accuracy.csv.gz`` once (cached) into an :class:`NB201Table`."""
    raw = (_DATA_DIR / _TABLE_FILE).read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    reader = csv.DictReader(io.StringIO(text))
    archs: list[str] = []
    uniq: list[str] = []
    cols: dict[str, list[float]] = {d: [] for d in DATASETS}
    for row in reader:
        archs.append(row["ArchitectureString"])
        uniq.append(row["UniqueString"])
        for d, c in _COLUMNS.items():
            # rounded to 1e-6 (%): the table's means of three seeds carry float noise
            # (61.99333333333333 and ...34), which split ties in rank() and percentile();
            # one test image of 10,000 (6,000) is 1e-2 % (1.7e-2 %), a third of that in a
            # mean of three seeds: real differences are far above the rounding
            cols[d].append(round(float(row[c]), 6))
    if len(archs) != NUM_ARCHS or len(set(archs)) != NUM_ARCHS:
        raise RuntimeError(f"corrupt {_TABLE_FILE}: {len(archs)} rows, expected {NUM_ARCHS}")
    acc = {}
    for d in DATASETS:
        a = np.asarray(cols[d], dtype=np.float64)
        a.setflags(write=False)
        acc[d] = a
    return NB201Table(
        archs=tuple(archs),
        unique=tuple(uniq),
        acc=acc,
        index={a: i for i, a in enumerate(archs)},
    )


def _dataset(dataset: str) -> str:
    key = _DATASET_ALIASES.get(dataset.lower()) if isinstance(dataset, str) else None
    if key is None:
        raise OptionError(f"unknown NB201 dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return key


@functools.lru_cache(maxsize=len(DATASETS))
def _sorted_acc(dataset: str) -> np.ndarray:
    return np.sort(load_table().acc[dataset])


def accuracy(arch: ArchLike, dataset: str = "cifar10") -> float:
    """200-epoch test accuracy (%) of ``arch`` on ``dataset`` (see :data:`DATASETS`)."""
    d = _dataset(dataset)
    t = load_table()
    return float(t.acc[d][t.index[_as_arch(arch)]])


def rank(arch: ArchLike, dataset: str = "cifar10") -> int:
    """Rank of ``arch`` on ``dataset``: 1 = best; ties share a rank (1 + #strictly better)."""
    d = _dataset(dataset)
    a = accuracy(arch, d)
    s = _sorted_acc(d)
    better = len(s) - int(np.searchsorted(s, a, side="right"))
    return better + 1


def percentile(arch: ArchLike, dataset: str = "cifar10") -> float:
    """Percentage (0-100) of the 15,625 archs strictly worse than ``arch`` on ``dataset``."""
    d = _dataset(dataset)
    a = accuracy(arch, d)
    s = _sorted_acc(d)
    worse = int(np.searchsorted(s, a, side="left"))
    return 100.0 * worse / len(s)


# ---------------------------------------------------------------------------
# Model (state_dict-compatible with NAS-Bench-201's TinyNetwork)
# ---------------------------------------------------------------------------


class ReLUConvBN(nn.Module):
    """``op`` = Sequential(ReLU, Conv2d(bias=False), BatchNorm2d(affine, running stats))."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int = 1
    ):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                C_in,
                C_out,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                bias=False,
            ),
            nn.BatchNorm2d(C_out, affine=True, track_running_stats=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Zero(nn.Module):
    """The ``none`` op: zeros of the output shape (``x.mul(0.)`` as in the official code)."""

    def __init__(self, C_in: int, C_out: int, stride: int):
        super().__init__()
        self.C_in = C_in
        self.C_out = C_out
        self.stride = stride
        self.is_zero = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.C_in == self.C_out:
            if self.stride == 1:
                return x.mul(0.0)
            return x[:, :, :: self.stride, :: self.stride].mul(0.0)
        # Channel change: slice/expand keeps it vmap-friendly and out of place.
        y = x[:, :1, :: self.stride, :: self.stride].mul(0.0)
        return y.expand(-1, self.C_out, -1, -1)


class Identity(nn.Module):
    """The ``skip_connect`` op inside a cell (stride 1, C_in == C_out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class AvgPool3x3(nn.AvgPool2d):
    """``nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)``, computed on the CPU
    as a depthwise 3x3 box filter divided by the number of in-bounds positions.

    The same function (only the summation order, i.e. float rounding, differs), with the
    same attributes and no parameters, so state dicts and ``isinstance`` checks are
    unaffected. PyTorch's CPU ``avg_pool2d`` is slow for this shape: measured on the
    2-core development CPU (float32, N=32, best of 3), forward 3.26 ms vs 0.97 ms at
    16x32x32 and 1.50 vs 0.48 ms at 64x8x8, backward 3.44 vs 1.04 ms and 1.77 vs 0.56 ms
    (``python bench/bench_engine_choices.py pool``, bench/results/engine_choices_cpu.md).
    On GPUs the built-in op is used (not measured there).
    """

    def __init__(self, stride: int = 1):
        super().__init__(3, stride=stride, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.device.type != "cpu":
            return super().forward(x)
        box = x.new_ones(1, 1, 3, 3)
        sums = F.conv2d(x, box.expand(x.shape[1], 1, 3, 3), stride=self.stride, padding=1,
                        groups=x.shape[1])
        count = F.conv2d(x.new_ones(1, 1, *x.shape[2:]), box, stride=self.stride, padding=1)
        return sums / count


class Pooling(nn.Module):
    """The ``avg_pool_3x3`` op: ``op`` = AvgPool2d(3, stride, 1, count_include_pad=False).

    ``preprocess`` is ``None`` when ``C_in == C_out`` (always, inside cells), else
    a 1x1 ReLUConvBN as in the official ``POOLING``.
    """

    def __init__(self, C_in: int, C_out: int, stride: int):
        super().__init__()
        self.preprocess = None if C_in == C_out else ReLUConvBN(C_in, C_out, 1, 1, 0)
        self.op = AvgPool3x3(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preprocess is not None:
            x = self.preprocess(x)
        return self.op(x)


def _make_op(name: str, C_in: int, C_out: int, stride: int) -> nn.Module:
    if name == "none":
        return Zero(C_in, C_out, stride)
    if name == "skip_connect":
        if stride != 1 or C_in != C_out:
            raise ArchitectureError("skip_connect with a stride or channel change is not in NB201")
        return Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(C_in, C_out, 1, stride, 0)
    if name == "nor_conv_3x3":
        return ReLUConvBN(C_in, C_out, 3, stride, 1)
    if name == "avg_pool_3x3":
        return Pooling(C_in, C_out, stride)
    raise ArchitectureError(f"unknown op {name!r}; allowed ops: {', '.join(OPS)}")


class InferCell(nn.Module):
    """A searched cell: ``layers`` holds the 6 edge ops in edge order; output = node 3."""

    def __init__(self, arch: str, C_in: int, C_out: int, stride: int = 1):
        super().__init__()
        ops = parse_arch(arch)
        self.arch = arch
        self.layers = nn.ModuleList()
        for (_j, k), op in zip(EDGES, ops, strict=True):
            if k == 0:
                self.layers.append(_make_op(op, C_in, C_out, stride))
            else:
                self.layers.append(_make_op(op, C_out, C_out, 1))
        self.in_dim = C_in
        self.out_dim = C_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        e = 0
        for j in range(1, NUM_NODES):
            acc = None
            for k in range(j):
                y = self.layers[e](nodes[k])
                e += 1
                acc = y if acc is None else acc + y
            nodes.append(acc)
        return nodes[-1]

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, C_in={self.in_dim}, C_out={self.out_dim}"


# ---------------------------------------------------------------------------
# Supernets (TE-NAS-style pruning): every edge averages a set of candidate ops.
# ---------------------------------------------------------------------------

SUPER_SEP = "&"


def format_supernet(ops_per_edge) -> str:
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

    def __init__(self, ops, C_in: int, C_out: int, stride: int):
        super().__init__()
        self.names = tuple(ops)
        self.ops = nn.ModuleDict({op: _make_op(op, C_in, C_out, stride) for op in ops})

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


def build_supernet(ops_per_edge, num_classes: int = 10, C: int = 16, N: int = 5) -> nn.Module:
    """The NB201 network whose cells average, on every edge, the given candidate ops."""
    arch = ops_per_edge if isinstance(ops_per_edge, str) else format_supernet(ops_per_edge)
    parse_supernet(arch)
    return TinyNetwork(arch, C=C, N=N, num_classes=num_classes)


class ResNetBasicblock(nn.Module):
    """Reduction block: ``conv_b(conv_a(x)) + downsample(x)`` (stride 2)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 2):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"invalid stride {stride}")
        self.conv_a = ReLUConvBN(inplanes, planes, 3, stride, 1)
        self.conv_b = ReLUConvBN(planes, planes, 3, 1, 1)
        if stride == 2:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, padding=0, bias=False),
            )
        elif inplanes != planes:
            self.downsample = ReLUConvBN(inplanes, planes, 1, 1, 0)
        else:
            self.downsample = None
        self.in_dim = inplanes
        self.out_dim = planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_b(self.conv_a(x))
        residual = x if self.downsample is None else self.downsample(x)
        return residual + out


class TinyNetwork(nn.Module):
    """NAS-Bench-201's ``TinyNetwork`` (forward returns ``(features, logits)``)."""

    def __init__(self, arch: str, C: int = 16, N: int = 5, num_classes: int = 10):
        super().__init__()
        self.arch = arch
        self._C = C
        self._layerN = N
        self.stem = nn.Sequential(
            nn.Conv2d(3, C, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(C)
        )
        channels = [C] * N + [C * 2] + [C * 2] * N + [C * 4] + [C * 4] * N
        reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
        C_prev = C
        self.cells = nn.ModuleList()
        for C_curr, reduction in zip(channels, reductions, strict=True):
            if reduction:
                cell: nn.Module = ResNetBasicblock(C_prev, C_curr, 2)
            else:
                cell = (SuperCell if SUPER_SEP in arch else InferCell)(arch, C_prev, C_curr, 1)
            self.cells.append(cell)
            C_prev = C_curr
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.stem(x)
        for cell in self.cells:
            feature = cell(feature)
        out = self.lastact(feature)
        out = self.global_pooling(out)
        out = out.flatten(1)
        logits = self.classifier(out)
        return out, logits


def build_model(arch: ArchLike, num_classes: int = 10, C: int = 16, N: int = 5) -> TinyNetwork:
    """Untrained NAS-Bench-201 network of ``arch`` (default PyTorch initialisation).

    The module tree, parameter and buffer names and shapes equal those of the
    official ``TinyNetwork(C, N, genotype, num_classes)``, so official
    checkpoints load with ``load_state_dict(strict=True)``. ``forward`` returns
    ``(features, logits)`` with ``features`` the pooled ``(B, 4C)`` vector.
    No op works in place, so the model runs under ``torch.func`` transforms.
    """
    arch = _as_arch(arch)
    num_classes = positive_int("num_classes", num_classes)  # (numpy integers too, not bools)
    C, N = positive_int("C", C), positive_int("N", N, minimum=0)
    return TinyNetwork(arch, C=C, N=N, num_classes=num_classes)


# ---------------------------------------------------------------------------
# SearchSpace
# ---------------------------------------------------------------------------


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
        ops = list(parse_arch(_as_arch(arch)))
        e = rng.randrange(len(EDGES))
        choices = [op for op in OPS if op != ops[e]]
        ops[e] = choices[rng.randrange(len(choices))]
        return format_arch(ops)

    def build(self, arch: str, num_classes: int = 10) -> nn.Module:
        if isinstance(arch, str) and SUPER_SEP in arch:
            return build_supernet(arch, num_classes=num_classes, C=self.C, N=self.N)
        return build_model(arch, num_classes=num_classes, C=self.C, N=self.N)

    def encode(self, arch: str) -> str:
        if isinstance(arch, str) and SUPER_SEP in arch:
            return format_supernet(parse_supernet(arch))
        return _as_arch(arch)

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
