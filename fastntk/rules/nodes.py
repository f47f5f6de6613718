"""Node rules: a parameter's per-sample gradients read off the one autograd node using it.

Many parameters have no module rule: a layer scale (``gamma * x`` in ConvNeXt), the weight
of a hand-written norm (RMSNorm, T5's LayerNorm, ``ConvNextLayerNorm``), HF's ``Conv1D``
(``addmm`` with an (in, out) weight), a position embedding added outside any module. Where
the autograd graph shows the parameter used once, by one simple node, the engine hooks
that node as if it were a module: the node's output gradient ``g`` (the samples in dim 0,
or in sample-major blocks of ``T`` rows) and what the node saved for its own backward give
each sample's gradient exactly, without the torch.func fallback.

Derivations, for sample ``i`` (``p'``: the parameter as the node sees it, broadcast
against the node's output ``y``; the sums run over the dims ``p'`` is broadcast along):

* ``AddBackward0``/``SubBackward0`` (``y = x ± alpha * p'``), ``ExpandBackward0``
  (``y = p'.expand(n, ...)``): ``dp'_i = ±alpha * sum g_i``.
* ``MulBackward0`` (``y = x * p'``): ``dp'_i = sum (g * x)_i``.
* ``NativeLayerNormBackward0`` (``F.layer_norm(x, s, w, b)``, over the trailing dims
  ``s``): ``dw_i = sum (g * xhat)_i``, ``db_i = sum g_i``, with ``xhat = (x - mean) *
  rstd`` from the node's saved input and statistics.
* a sample-free subgraph ``z = f(p)`` (a position embedding's lookup, a relative-position
  bias) added to, or multiplying, a batched tensor: ``dp_i = (df/dp)^T dz_i`` with
  ``dz_i`` as above for ``z``, one batched vector-Jacobian product of ``f``.
* ``AddmmBackward0``/``MmBackward0`` (``y = beta * b + alpha * X @ p'``, the rows of ``X``
  the samples, or ``T`` rows per sample in sample-major order: ``x.view(-1, d)`` of a
  batch-first ``(n, T, d)``): ``dp'_i = alpha * X_i^T g_i``, ``db_i = beta * sum_t g_i``.

``p'`` is the parameter itself or a view that keeps the order of its elements (unsqueeze,
view, reshape, squeeze, alias), so a flattened ``dp'_i`` is the parameter's flattened
gradient; or, for a 2-D parameter, its transpose (``W.t()``, as ``F.linear`` passes a
weight), whose gradient is transposed back. The engine (``engine.classify``) checks the
layout with its probe before a node rule serves: the node's output has the samples in dim
0, or the node's rows are sample-major blocks (the last sample's rows, run alone, are the
last ``T`` rows of the batch's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from fastntk.rules import Dense, GramRule, Outer

# order-preserving views a parameter may pass through on the way to its node
VIEWS = frozenset({
    "UnsqueezeBackward0", "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "AliasBackward0",
})  # fmt: skip
TRANSPOSE = "TBackward0"  # W.t() of a 2-D parameter (F.linear's weight)


@dataclass
class Use:
    """A parameter's one use: ``node`` takes ``view`` (the parameter's shape as the node
    sees it, after the views) as its input ``index``; ``transposed``: through ``.t()``.
    ``chain``: the nodes of a sample-free subgraph between the parameter and ``node``
    (an embedding of positions, a relative-position bias); empty where only views lie
    between them."""

    node: Any
    index: int
    view: tuple[int, ...]
    param: torch.Tensor
    transposed: bool = False
    chain: tuple[Any, ...] = ()
    rows: int = 1  # the node's output rows per sample (> 1: merged, sample-major)
    witness: torch.Tensor | None = None  # merged rows: a saved tensor with those rows

    @property
    def out(self) -> tuple[int, ...]:
        """The shape of the node's output (of its output gradient)."""
        return tuple(self.node._input_metadata[0].shape)

    @property
    def chain_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(c._input_metadata[0].shape) for c in self.chain]


def resolve(consumer: tuple[Any, int], param: torch.Tensor, consumers, n: int) -> list[Use] | None:
    """The node(s) a node rule would hook for ``param``, whose one use is ``consumer``
    (node, input index), in a chunk of ``n`` samples: past the views and a transpose that
    only lead to one further node (``consumers(node)``: the (node, index) edges into
    ``node``), the one node a rule serves; or else the exits of a sample-free subgraph of
    ``param`` (:func:`_sample_free_exits`). None: no node rule applies."""
    node, index = consumer
    view, transposed = tuple(param.shape), False
    while node.name() in VIEWS or node.name() == TRANSPOSE:
        if node.name() == TRANSPOSE:
            if transposed or len(view) != 2:
                return None
            transposed = True
        nxt = consumers(node)
        if len(nxt) != 1:
            return None
        view = tuple(node._input_metadata[0].shape)
        node, index = nxt[0]
    use = Use(node, index, view, param, transposed)
    if node.name() in RULES and RULES[node.name()].match(use, n) is not None:
        return [use]
    return _sample_free_exits(consumer, param, consumers, n)


def _shape(node: Any) -> tuple[int, ...]:
    return tuple(node._input_metadata[0].shape)


def _sample_free_exits(consumer, param, consumers, n) -> list[Use] | None:
    """The exits of ``param``'s sample-free subgraph: the nodes reachable from its use whose
    every input is the parameter or another node of the subgraph (so each output is a
    function of ``param`` alone, whatever constants join), up to the add, subtract or
    multiply nodes (``n`` rows out) where each branch meets a batched tensor. T5 computes
    its relative-position bias once and adds it in every layer: one exit per layer, whose
    gradients the engine sums (a parameter used several times). None where the subgraph
    takes another input that requires a gradient, reaches the output itself, or exceeds
    ``MAX_CHAIN`` nodes."""
    inside: dict[int, Any] = {}
    exits: dict[int, list[tuple[Any, int, int]]] = {}  # id: [(node, input index, rows)]
    stack = [consumer]
    while stack:
        node, index = stack.pop()
        rows = _rows_at_exit(node, index, n) if node.name() in SAMPLE_FREE.nodes else 0
        if rows:
            exits.setdefault(id(node), []).append((node, index, rows))
            continue
        if id(node) in inside:
            continue
        inside[id(node)] = node
        nxt = consumers(node)
        if len(inside) > MAX_CHAIN or not nxt:
            return None  # too large, or the output itself is sample-free
        stack.extend(nxt)
    for node in inside.values():  # a function of the parameter alone
        for f, _ in node.next_functions:
            if f is not None and id(f) not in inside and getattr(f, "variable", None) is not param:
                return None
    chain = tuple(inside.values())
    uses = []
    for lst in exits.values():
        if len(lst) != 1:
            return None  # (an exit taking the subgraph's tensors twice)
        node, index, rows = lst[0]
        src = node.next_functions[index][0]
        others = [f for j, (f, _) in enumerate(node.next_functions) if j != index and f is not None]
        if any(id(f) in inside for f in others) or not (others or rows > 1):
            return None  # the exit must meet a batched tensor (merged rows: or a constant)
        witness = None
        if rows > 1:  # the probe needs a saved tensor with the exit's rows to confirm them
            witness = _witness(node, consumers)
            if witness is None:
                return None
        uses.append(Use(node, index, _shape(src), param, chain=chain, rows=rows, witness=witness))
    return uses or None


def _rows_at_exit(node: Any, index: int, n: int) -> int:
    """The rows per sample of ``node``'s output where ``node`` may be the exit of a
    sample-free subgraph entering through input ``index`` in a chunk of ``n`` samples: 1
    where its output has the samples in dim 0; ``T`` where its output has ``n T`` rows and
    the subgraph's tensor is broadcast along dim 0 (Swin's relative-position bias, (1, h,
    S, S), added to attention scores of (n windows, h, S, S)); else 0 (not an exit)."""
    out = _shape(node)
    if not out or out[0] % n:
        return 0
    if out[0] == n:
        return 1
    src = _shape(node.next_functions[index][0])
    return out[0] // n if len(src) < len(out) or src[0] == 1 else 0


MAX_CHAIN = 16  # nodes of a sample-free chain a node rule follows

# After an exit with merged rows: nodes that keep the rows of their output where they were
# (elementwise, the output's shape unchanged), and nodes saving a tensor of that shape whose
# rows are the exit output's, transformed row by row (softmax over a later dim, unary
# maps). Such a tensor is the witness the probe compares (``classify._confirmed``).
ROWWISE = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"})
WITNESS = {
    "SoftmaxBackward0": "_saved_result", "SafeSoftmaxBackward0": "_saved_result",
    "LogSoftmaxBackward0": "_saved_result", "TanhBackward0": "_saved_result",
    "SigmoidBackward0": "_saved_result", "GeluBackward0": "_saved_self",
}  # fmt: skip
MAX_WITNESS_STEPS = 4


def _witness(exit_node: Any, consumers) -> torch.Tensor | None:
    """A saved tensor whose rows are ``exit_node``'s output rows, in place (``WITNESS``),
    found within ``MAX_WITNESS_STEPS`` single-consumer ``ROWWISE`` nodes; or None."""
    shape, node = _shape(exit_node), exit_node
    for _ in range(MAX_WITNESS_STEPS):
        nxt = consumers(node)
        if len(nxt) != 1 or _shape(nxt[0][0]) != shape:
            return None
        node = nxt[0][0]
        attr = WITNESS.get(node.name())
        if attr is None:
            if node.name() not in ROWWISE:
                return None
            continue
        dim = getattr(node, "_saved_dim", None)
        if dim is not None and (dim if dim < 2**63 else dim - 2**64) % len(shape) == 0:
            return None  # a softmax over the rows mixes them
        t = getattr(node, attr, None)
        return t.detach() if isinstance(t, torch.Tensor) and tuple(t.shape) == shape else None
    return None


def find(use: Use, n: int) -> tuple[NodeRule, Any] | None:
    """(the rule serving ``use`` in a chunk of ``n`` samples, its saved state), or None."""
    rule = SAMPLE_FREE if use.chain else RULES.get(use.node.name())
    if rule is None:
        return None
    saved = rule.match(use, n)
    return None if saved is None else (rule, saved)


class NodeRule(GramRule):
    """A rule of one autograd node (module docstring). :meth:`match` reads what
    :meth:`grad_rows` needs off the node after the forward; ``rows_input`` gives, for a
    node with merged rows, the tensor whose rows the probe compares."""

    param_names = ()
    nodes: tuple[str, ...] = ()

    def match(self, use: Use, n: int) -> Any:
        """The saved state for ``use`` in a chunk of ``n`` samples, or None where this rule
        cannot serve it (shapes, or a saved tensor it needs is missing)."""
        raise NotImplementedError

    def rows_per_sample(self, saved: Any) -> int:
        """``T``: the node's rows per sample (1: the samples are dim 0 of its output)."""
        return 1

    def rows_input(self, saved: Any) -> torch.Tensor | None:
        return None

    def root(self, saved: Any, param: torch.Tensor) -> Any:
        """What the backward must compute a gradient for, so that it runs the node."""
        return param


def _broadcast_dims(view: tuple[int, ...], out: tuple[int, ...]) -> list[int] | None:
    """Dims of ``out`` (samples in dim 0) that ``view`` is broadcast along, or None where
    ``view`` does not broadcast to ``out`` without its own sample dim."""
    if len(view) > len(out) or (len(view) == len(out) and view and view[0] != 1):
        return None
    padded = (1,) * (len(out) - len(view)) + view
    if any(v not in (1, o) for v, o in zip(padded, out, strict=True)):
        return None
    return [d for d in range(1, len(out)) if padded[d] == 1 and out[d] != 1]


def _rows(g: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """(n, *out) -> (n, numel of the parameter): ``g`` summed over the broadcast dims."""
    s = g.sum(dims) if dims else g
    return s.reshape(s.shape[0], -1)


class BroadcastRule(NodeRule):
    """``x ± alpha * p'`` and ``p'.expand(n, ...)``: ViT position embeddings, class tokens,
    biases added by hand. ``saved``: (broadcast dims, alpha)."""

    nodes = ("AddBackward0", "SubBackward0", "ExpandBackward0")

    def match(self, use, n):
        out = use.out
        dims = _broadcast_dims(use.view, out) if out and out[0] == n else None
        if dims is None or use.transposed:
            return None
        name = use.node.name()
        if name == "ExpandBackward0":
            return dims, 1.0
        alpha = getattr(use.node, "_saved_alpha", None) if use.index == 1 else 1
        if not isinstance(alpha, (int, float)):
            return None
        sign = -1 if name == "SubBackward0" and use.index == 1 else 1
        return dims, float(sign * alpha)

    def grad_rows(self, module, saved, gout, name, r0, r1):
        dims, alpha = saved
        G = _rows(gout, dims)
        return Dense(G if alpha == 1 else G * alpha)


class ScaleRule(NodeRule):
    """``x * p'``: layer scales, the weight of RMSNorm and T5's LayerNorm.
    ``saved``: (broadcast dims, x)."""

    nodes = ("MulBackward0",)

    def match(self, use, n):
        out = use.out
        dims = _broadcast_dims(use.view, out) if out and out[0] == n else None
        if dims is None or use.transposed:
            return None
        other = getattr(use.node, "_saved_other" if use.index == 0 else "_saved_self", None)
        if not isinstance(other, torch.Tensor):
            return None
        return dims, other.detach()

    def grad_rows(self, module, saved, gout, name, r0, r1):
        dims, other = saved
        return Dense(_rows(gout * other, dims))


class LayerNormNodeRule(NodeRule):
    """``F.layer_norm`` outside an ``nn.LayerNorm`` rule (``ConvNextLayerNorm``, a
    LayerNorm on a permuted tensor). ``saved``: (dims to sum, xhat or None for the bias)."""

    nodes = ("NativeLayerNormBackward0",)

    def match(self, use, n):
        node, out = use.node, use.out
        shape = tuple(getattr(node, "_saved_normalized_shape", ()))
        if use.index not in (1, 2) or use.transposed or not out or out[0] != n:
            return None
        if use.view != shape or len(out) <= len(shape):
            return None
        dims = list(range(1, len(out) - len(shape)))
        if use.index == 2:
            return dims, None
        x, mean, rstd = (getattr(node, a, None) for a in ("_saved_input", "_saved_result1",
                                                          "_saved_result2"))  # fmt: skip
        if not all(isinstance(t, torch.Tensor) for t in (x, mean, rstd)):
            return None
        return dims, (x.detach(), mean.detach(), rstd.detach())

    def grad_rows(self, module, saved, gout, name, r0, r1):
        dims, stats = saved
        if stats is None:
            return Dense(_rows(gout, dims))
        x, mean, rstd = stats
        return Dense(_rows(gout * ((x - mean) * rstd), dims))


class MatmulRule(NodeRule):
    """``X @ p'`` (+ a bias): HF ``Conv1D`` (an (in, out) weight through ``addmm``), and
    ``F.linear`` on rows that merge the samples with their tokens or windows (Swin's
    window attention). ``saved``: (what, X or None, T, scale) with ``what`` one of
    "weight", "weight_t" (the parameter is ``p'.t()``) or "bias"."""

    nodes = ("AddmmBackward0", "MmBackward0")

    def match(self, use, n):
        node, out = use.node, use.out
        if len(out) != 2 or n == 0 or out[0] % n:
            return None
        T = out[0] // n
        addmm = node.name() == "AddmmBackward0"
        if addmm and use.index == 0:  # the bias, broadcast over the rows
            if use.transposed or use.view not in ((out[1],), (1, out[1])):
                return None
            beta = getattr(node, "_saved_beta", None)
            X = getattr(node, "_saved_mat1", None)  # (for the probe's check of the rows)
            return ("bias", X.detach() if isinstance(X, torch.Tensor) else None, T, beta)
        if use.index != (2 if addmm else 1):
            return None
        X = getattr(node, "_saved_mat1" if addmm else "_saved_self", None)
        alpha = getattr(node, "_saved_alpha", 1) if addmm else 1
        if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.shape[0] != out[0]:
            return None
        if use.view != (X.shape[1], out[1]):
            return None
        return ("weight_t" if use.transposed else "weight", X.detach(), T, alpha)

    def rows_per_sample(self, saved):
        return saved[2]

    def rows_input(self, saved):
        return saved[1]

    def grad_rows(self, module, saved, gout, name, r0, r1):
        what, X, T, scale = saved
        if not isinstance(scale, (int, float)):
            raise ValueError("addmm with a tensor alpha or beta")  # (match() lets none in)
        n = gout.shape[0] // T
        g = gout if scale == 1 else gout * scale
        if what == "bias":
            return Dense(g.reshape(n, T, -1).sum(1))
        if T == 1:  # rank one per sample: the ghost Gram
            return Outer(X, g) if what == "weight" else Outer(g, X)
        X3, g3 = X.reshape(n, T, -1), g.reshape(n, T, -1)
        G = torch.bmm(X3.transpose(1, 2), g3) if what == "weight" else torch.bmm(
            g3.transpose(1, 2), X3)  # fmt: skip
        return Dense(G.reshape(n, -1))


class SampleFreeRule(NodeRule):
    """A parameter reaching the batch through a sample-free subgraph ``z = f(p)`` added to
    (or multiplying) a batched tensor: BERT's and GPT-2's position embeddings, T5's
    relative-position bias; Swin's, added to the attention scores of each sample's windows
    (``T`` rows per sample, sample-major: the probe compares a saved tensor with those
    rows, :func:`_witness`). The rule reduces the node's output gradient to ``z``'s shape
    per sample (as :class:`BroadcastRule` and :class:`ScaleRule` do for ``p`` itself),
    then pulls each sample's ``dz_i`` back through ``f`` with one batched vector-Jacobian
    product (``torch.autograd.grad(..., is_grads_batched=True)`` on the chain's last
    node). The backward itself never runs ``f``: its root is that node's output, so ``f``'s
    graph stays for the products, whenever the engine asks for them.
    Where ``f`` starts with a lookup of rows of ``p`` (``p[idx]``: Swin's and T5's
    relative-position tables, a position embedding indexed by position ids), the product
    stops at the lookup's output and each sample's rows are scattered with one
    ``index_add_``: autograd's batched product of the lookup has no batching rule for
    ``index_put`` and runs one per sample (N=64, Swin's 4x4 windows and 2 heads: 0.42
    against 0.14 ms; 7x7 windows, 3 heads: 1.6 against 0.8 ms; ``python
    bench/bench_engine_choices.py lookup``, bench/results/engine_choices_cpu.md).
    ``saved``: (broadcast dims, alpha or the other factor, z's shape, the edge into
    ``f``'s output, the parameter, rows per sample, the witness of merged rows, the
    lookup (its output's edge and the row indices) or None)."""

    nodes = ("AddBackward0", "SubBackward0", "MulBackward0")

    def match(self, use, n):
        node, T = use.node, use.rows
        out = use.out
        if not out or out[0] != n * T:
            return None
        dims = _broadcast_dims(use.view, (n, *out[1:]))
        if dims is None:
            return None
        if node.name() == "MulBackward0":
            factor = getattr(node, "_saved_other" if use.index == 0 else "_saved_self", None)
            if not isinstance(factor, torch.Tensor):
                return None
            factor = factor.detach()
        else:
            alpha = getattr(node, "_saved_alpha", None) if use.index == 1 else 1
            if not isinstance(alpha, (int, float)):
                return None
            factor = float(-alpha if node.name() == "SubBackward0" and use.index == 1 else alpha)
        edge = GradientEdge(*node.next_functions[use.index])
        return dims, factor, use.view, edge, use.param, T, use.witness, _lookup(use)

    def root(self, saved, param):
        return saved[3]

    def rows_per_sample(self, saved):
        return saved[5]

    def rows_input(self, saved):
        return saved[6]

    def grad_rows(self, module, saved, gout, name, r0, r1):
        dims, factor, view, edge, param, T, _, lookup = saved
        g = gout * factor if not (isinstance(factor, float) and factor == 1) else gout
        if T > 1:  # merged rows, sample-major (the probe confirmed): each sample's summed
            g = g.reshape(g.shape[0] // T, T, *g.shape[1:]).sum(1)
        dz = (g.sum(dims, keepdim=True) if dims else g).reshape(g.shape[0], *view)
        target = param if lookup is None else lookup[0]
        try:
            (G,) = torch.autograd.grad(edge, target, dz, retain_graph=True, is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: one product per sample
            G = torch.stack([torch.autograd.grad(edge, target, d, retain_graph=True)[0]
                             for d in dz])  # fmt: skip
        if lookup is not None:  # the looked-up rows' gradients, back into p's rows
            idx = lookup[1]
            rows = G.new_zeros(G.shape[0], param.shape[0] + 1, *param.shape[1:])
            rows.index_add_(1, idx, G.reshape(G.shape[0], idx.numel(), *param.shape[1:]))
            G = rows[:, :-1]  # (the last row: a padding_idx's, dropped)
        return Dense(G.reshape(G.shape[0], -1))


def _lookup(use: Use) -> tuple[GradientEdge, torch.Tensor] | None:
    """(the edge of the lookup's output, its row indices, flattened) where the sample-free
    subgraph of ``use`` starts with a lookup of rows of the parameter itself: ``p[idx]``
    by one index tensor, or ``F.embedding(idx, p)`` without ``scale_grad_by_freq``
    (a ``padding_idx`` row's gradient is zero: its indices point past the table, where
    :meth:`SampleFreeRule.grad_rows` drops them). None for any other subgraph."""
    if not use.chain:
        return None
    first = use.chain[0]  # (the parameter's consumer: _sample_free_exits' first node)
    if getattr(first.next_functions[0][0], "variable", None) is not use.param:
        return None
    if first.name() == "IndexBackward0":
        indices = getattr(first, "_saved_indices", None)
        if not indices or len(indices) != 1 or not isinstance(indices[0], torch.Tensor):
            return None
        idx = indices[0]
    elif first.name() == "EmbeddingBackward0" and not first._saved_scale_grad_by_freq:
        idx = first._saved_indices
        pad = first._saved_padding_idx  # (unsigned: -1, none, reads 2**64 - 1)
        if 0 <= pad < use.param.shape[0]:
            idx = torch.where(idx == pad, use.param.shape[0], idx)
    else:
        return None
    if idx.dtype not in (torch.int64, torch.int32):
        return None  # (a boolean mask selects, it does not look up)
    idx = idx.detach().reshape(-1)
    return GradientEdge(first, 0), torch.where(idx < 0, idx + use.param.shape[0], idx)


SAMPLE_FREE = SampleFreeRule()
RULES: dict[str, NodeRule] = {
    name: rule
    for rule in (BroadcastRule(), ScaleRule(), LayerNormNodeRule(), MatmulRule())
    for name in rule.nodes
}


def sample_major(rows: torch.Tensor, probe_rows: torch.Tensor, n: int, q: int,
                 tol: float) -> bool:  # fmt: skip
    """Whether a node's ``rows`` (n·T of them) are sample-major blocks, judged against the
    probe's ``probe_rows`` for its ``q`` samples: the chunk's last ``q`` (``n > q``), or the
    chunk's ``n`` then padding (``n <= q``)."""
    if rows.shape[0] % n or probe_rows.shape[0] % q or rows.shape[1:] != probe_rows.shape[1:]:
        return False
    T = rows.shape[0] // n
    if probe_rows.shape[0] != q * T:
        return False
    a, b = (rows[(n - q) * T :], probe_rows) if n > q else (rows, probe_rows[: n * T])
    a, b = a.detach(), b.detach()
    scale = float(torch.maximum(a.abs().max(), b.abs().max())) if a.numel() else 0.0
    return float((a - b).abs().max()) <= tol * max(scale, 1e-30) if a.numel() else True
