"""Walks over nested containers of tensors (a module call's ``(args, kwargs)``, its
outputs) and over autograd graphs, shared by the capture, the probe and the fallbacks.

Every autograd node compared by id is held alive while a walk lasts: the Python object of
a node can be a temporary (torch 2.11 makes a fresh one per ``next_functions`` access),
and an id freed with it can come back for another node.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with every tensor ``t`` in its tuples, lists and dicts replaced by ``fn(t)``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [map_tensors(o, fn) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def detach(obj: Any) -> Any:
    return map_tensors(obj, torch.Tensor.detach)


def hooked_outputs(tensors: list[torch.Tensor]) -> list[int]:
    """Positions of the outputs whose gradients a call's hooks take: those in the graph,
    each autograd output once (a module returning ``(a, a)`` has one output: the gradient
    at its node already holds both uses, and counting it per position doubled it)."""
    pos, seen = [], []
    for i, t in enumerate(tensors):
        if not (t.requires_grad and t.grad_fn is not None):
            continue
        node = t.grad_fn  # held in `seen` while compared (see graph_nodes)
        if any(node is m and t.output_nr == nr for m, nr in seen):
            continue
        seen.append((node, t.output_nr))
        pos.append(i)
    return pos


def fed_outputs(outs: list[torch.Tensor], inputs: list[torch.Tensor], limit: int = 20000):
    """Indices of the outputs of one module call that its other outputs are computed from.

    ``nn.LSTMCell`` returns ``(h, c)`` with ``h = o * tanh(c)``: the gradient reaching
    ``c``'s autograd node then holds the path through ``h`` too, and a fallback given
    both outputs' gradients would count that path twice. Walks each output's graph back
    to the call's inputs (at most ``limit`` nodes per output).
    """
    # Every node compared by id is held here while the walk lasts: an autograd node's
    # Python object lives only while referenced, and a later access can make a new one
    # with another id (torch 2.11; see graph_nodes).
    held = [t.grad_fn for t in outs] + [t.grad_fn for t in inputs if t.grad_fn is not None]
    node_of: dict[int, list[int]] = {}
    for j, node in enumerate(held[: len(outs)]):
        node_of.setdefault(id(node), []).append(j)
    stops = {id(node) for node in held[len(outs) :]}
    fed: set[int] = set()
    for root in held[: len(outs)]:
        keep: list[Any] = []  # visited nodes stay alive (see graph_nodes)
        seen = {id(root)}
        stack = [nxt for nxt, _ in root.next_functions if nxt is not None]
        while stack and len(keep) < limit:
            node = stack.pop()
            if id(node) in seen or id(node) in stops:
                continue
            seen.add(id(node))
            keep.append(node)
            fed.update(node_of.get(id(node), ()))
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return sorted(fed)


def tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            out.extend(tensors(o))
    elif isinstance(obj, dict):
        for o in obj.values():
            out.extend(tensors(o))
    return out


def graph_nodes(y: torch.Tensor):
    """Every node of ``y``'s autograd graph, once.

    Visited nodes are kept alive while the walk lasts: the Python object of an autograd
    node can be a temporary (torch 2.11 makes a fresh one per ``next_functions`` access),
    and an id freed with it can come back for another node, which would then be skipped
    (MHA's ``out_proj`` looked unused and a twice-used weight looked used once).
    """
    seen: dict[int, Any] = {}
    stack = [y.grad_fn] if y.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        yield node
        stack.extend(nxt for nxt, _ in getattr(node, "next_functions", ()) if nxt is not None)


class Consumers:
    """The edges into each node of ``y``'s autograd graph: ``consumers(node)`` lists the
    (node, input index) pairs that take ``node``'s output. Holds every node of the graph
    (so their ids stay theirs) until it is dropped."""

    def __init__(self, y: torch.Tensor):
        # graph_nodes' walk, reading each node's next_functions once (each read makes
        # Python objects of the next nodes); _nodes holds them, so their ids stay theirs
        self._nodes: dict[int, Any] = {}
        self._into: dict[int, list[tuple[Any, int]]] = defaultdict(list)
        walked: set[int] = set()
        stack = [y.grad_fn] if y.grad_fn is not None else []
        while stack:
            node = stack.pop()
            if id(node) in walked:
                continue
            walked.add(id(node))
            self._nodes.setdefault(id(node), node)
            for i, (nxt, _) in enumerate(getattr(node, "next_functions", ())):
                if nxt is not None:
                    self._nodes.setdefault(id(nxt), nxt)
                    self._into[id(nxt)].append((node, i))
                    if id(nxt) not in walked:
                        stack.append(nxt)

    def __call__(self, node: Any) -> list[tuple[Any, int]]:
        return self._into.get(id(node), [])

    def reaching(self, targets: list[Any]) -> set[int]:
        """Ids of the nodes with a path to one of ``targets``, theirs included: the nodes a
        backward to ``targets`` runs. A target is a leaf tensor (its accumulator), another
        tensor (its node), a ``GradientEdge`` (its node) or a node."""
        leaves = {id(t) for t in targets if isinstance(t, torch.Tensor) and t.grad_fn is None}
        stack = [t.grad_fn if isinstance(t, torch.Tensor) else getattr(t, "node", t)
                 for t in targets]  # fmt: skip
        stack += [node for node in self._nodes.values()
                  if id(getattr(node, "variable", None)) in leaves]  # fmt: skip
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend(parent for parent, _ in self._into.get(id(node), ()))
        return seen

    def params(self, params: dict[str, torch.Tensor]) -> dict[str, list[tuple[Any, int]]]:
        """:func:`param_consumers` from this walk: for each parameter of ``params``, the
        (node, input index) pairs of the edges into its accumulator."""
        want = {id(t): name for name, t in params.items()}
        uses: dict[str, list[tuple[Any, int]]] = defaultdict(list)
        for nid, node in self._nodes.items():
            var = getattr(node, "variable", None)
            if var is not None and id(var) in want:
                uses[want[id(var)]].extend(self._into.get(nid, []))
        return uses


def flatten(obj):
    """The leaves of nested tuples, lists and dicts, and the spec to rebuild them."""
    flat: list[Any] = []
    return flat, _flatten_into(obj, flat)


def _flatten_into(o, flat: list[Any]):
    # a module-level recursion: a closure that calls itself is a reference cycle, which
    # would keep ``flat`` (a module call's inputs: activations) alive until Python's cyclic
    # garbage collector runs (tests/test_engine.py: no tensor in a reference cycle)
    if isinstance(o, (tuple, list)):
        return (type(o), [_flatten_into(v, flat) for v in o])
    if isinstance(o, dict):
        return (dict, {k: _flatten_into(v, flat) for k, v in o.items()})
    flat.append(o)
    return None


def unflatten(flat, spec):
    it = iter(flat)

    def rec(s):
        if s is None:
            return next(it)
        typ, body = s
        if typ is dict:
            return {k: rec(v) for k, v in body.items()}
        vals = [rec(v) for v in body]
        return tuple(vals) if typ is tuple else vals

    return rec(spec)


def param_consumers(
    y: torch.Tensor, params: dict[str, torch.Tensor]
) -> dict[str, list[tuple[Any, int]]]:
    """Walk the autograd graph of ``y`` once: for each parameter of ``params`` (name ->
    tensor), the (node, input index) pairs of the edges into its accumulator."""
    want = {id(t): name for name, t in params.items()}
    uses: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in graph_nodes(y):
        for i, (nxt, _) in enumerate(getattr(node, "next_functions", ())):
            var = getattr(nxt, "variable", None)
            if var is not None and id(var) in want:
                uses[want[id(var)]].append((node, i))
    return uses
