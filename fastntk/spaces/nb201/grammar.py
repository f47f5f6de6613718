"""NAS-Bench-201 arch strings: the grammar, the enumeration and the isomorphism classes.

An architecture is a cell on 4 nodes; every edge ``k -> j`` (``k < j``) carries
one of five operations (:data:`OPS`). Its string form is::

    |op~0|+|op~0|op~1|+|op~0|op~1|op~2|

where group ``j`` (``j = 1, 2, 3``) lists the edges into node ``j`` and ``~k``
is the source node. Node ``j`` is the sum of ``op(node k)`` over its edges and
the cell outputs node 3. The 15,625 archs fall into 6,466 isomorphism classes
(:func:`unique_str`, :func:`canonical`).

Nothing here reads the accuracy table or imports torch.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

from fastntk.errors import ArchitectureError

__all__ = [
    "BENCH_ARCH",
    "EDGES",
    "NUM_ARCHS",
    "NUM_NODES",
    "NUM_UNIQUE",
    "OPS",
    "ArchLike",
    "as_arch",
    "canonical",
    "format_arch",
    "parse_arch",
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

BENCH_ARCH = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|"
    "avg_pool_3x3~2|"
)
"""The network of the project's measurements (830,426 parameters at C=16, N=5): the
workload of bench/bench_engine.py, bench_engine_choices.py, bench_sketch.py,
bench_large_n.py, ``bench/bench_models.py --model nb201`` and ``python -m fastntk demo``."""

ArchLike = str | Sequence[str]


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


def as_arch(arch: ArchLike) -> str:
    """Validated arch string from an arch string or a sequence of six op names.

    Raises:
        ArchitectureError: ``arch`` is neither, or malformed.
    """
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
    ops = parse_arch(as_arch(arch))
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
    return _canonical_map()[as_arch(arch)]
