"""Capture: forward hooks keep each planned module call's inputs, autograd-node hooks
deliver its output gradients during the backward, and the call's rule turns both into
per-sample gradient blocks handed to the consumer (the Gram accumulation, a panel, the
sketch). The routes are not the capture's: the strategy gives them (a route per call during
the forward, the classification of the chunk after it).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from fastntk.engine import graph, probe
from fastntk.profiling import phase
from fastntk.rules import Block, Context, Dense, GramRule, add_blocks, cat_blocks


def never(nbytes: int) -> bool:
    return False


def always(nbytes: int) -> bool:
    return True


@dataclass
class Record:
    """One call of one parameterised module during the forward pass."""

    index: int  # forward order
    mname: str
    module: nn.Module
    rule: GramRule | None  # None: torch.func fallback
    attrs: dict[str, str]  # attribute -> canonical parameter name (selected only)
    saved: Any
    n: int
    gouts: dict[int, Any] = field(default_factory=dict)  # pass -> grad(s) of output(s)
    # (shape, dtype, device) of the outputs whose gradients the hooks receive. Only
    # their description is kept: holding the tensors kept every layer's output alive
    # through the backward, BatchNorm outputs included, which autograd itself does not
    # save (NB201 N=256 "sum" peak RSS 2.83-3.03 GB before, 2.28 GB after, plain
    # forward+backward 2.27-2.36 GB: bench/bench_engine.py --n 256, bench/results/engine_cpu.csv).
    out_specs: list[tuple[torch.Size, torch.dtype, torch.device]] = field(default_factory=list)
    # (outputs that must not reach the kernel's output, fallback inputs): GramRule.guards
    guards: tuple[list[torch.Tensor], Any] | None = None
    # positions in ``graph.tensors(output)`` of the outputs whose gradients the hooks receive
    out_pos: list[int] = field(default_factory=list)
    dims: probe.CallDims | None = None  # measured sample dims of this call (the probe)
    # (output nodes, input nodes) of the call in the autograd graph, until the chunk is
    # classified: which parameter uses happen inside the call (_uses_outside_calls)
    graph: tuple[list[Any], list[Any]] | None = None

    @property
    def out_bytes(self) -> int:
        return sum(math.prod(sh) * dt.itemsize for sh, dt, _ in self.out_specs)


# route(mname, k, module, rule, args, kwargs, out, tensors, pos, n) -> (the rule the call
# takes (None: the per-module fallback) or WHOLE, its measured sample dims): the call's
# route, decided by the strategy (:class:`fastntk.engine.classify.Router`)
Route = Callable[..., tuple[Any, Any]]
WHOLE = "whole"  # a call with no per-module handling: its parameters go to the model fallback


class Capture:
    """Hooks of one forward/backward: records each planned module call, saves its inputs
    in the form of the route it is given, and hands the output gradients the backward
    delivers to the call's rule (or the per-module fallback, ``module_grads``) and the
    blocks they give to ``consume``. It decides no route: ``route`` does, during the
    forward, and the strategy's classification after it (through :meth:`to_fallback`,
    :meth:`adopt`, :meth:`add_node_rule`, :meth:`exclude`, :meth:`defer`)."""

    def __init__(
        self,
        call: Any,
        route: Route,
        module_grads: Callable[[Record, list], dict[str, torch.Tensor]],
        n: int,
        consume: Callable[[tuple, Block], None],
        streams: Callable[[int], bool] = never,
    ):
        self.call = call  # the call's state (engine.call.Call): copies, plan, workspace
        self.route = route
        self.module_grads = module_grads
        self.n = n  # samples of this chunk
        self.consume = consume
        # whether ``consume`` is done with a block of this many bytes when it returns (then
        # rules may write it into reused workspace memory)
        self.streams = streams
        self.records: list[Record] = []
        self.roots: list[torch.Tensor] = []
        # node rules' (node, the parameter's input index, parameter): roots only where
        # nothing else makes the backward run the node (settle_node_roots)
        self.node_roots: list[tuple[Any, int, torch.Tensor]] = []
        self.active = False
        self.pass_idx = 0
        self.deferred_params: set[str] = set()  # processed after all passes
        self.excluded: set[str] = set()  # handled by the whole-model fallback
        self.node_rules: dict[str, str] = {}  # parameter -> its node rule (rules.nodes)
        self._node_records: set[int] = set()  # indices of the node rules' records
        self.handles: list[Any] = []
        self.calls_seen: dict[str, int] = {}  # module name -> calls so far (probe keys)
        self.npasses = 1
        # trace/mean with small enough output gradients: keep every logit's gradients
        # and hand them to the rules together (shared patches, bigger GEMMs)
        self.batch_passes = False

    # -- forward -----------------------------------------------------------
    def install(self) -> None:
        for route in self.call.plan.routes:
            mname, attrs = route.module_name, dict(route.attrs)
            # prepend: before the user's own forward hooks, which may return a changed
            # output (3 * out): the rules need the module's own output and its gradient
            h = route.module.register_forward_hook(
                self._make_hook(mname, route.rule, attrs), with_kwargs=True, prepend=True
            )
            self.handles.append(h)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def release(self) -> None:
        """Break the reference cycle record -> output -> autograd node -> prehook -> record.

        Without this, every call's activations stay alive until Python's cyclic
        garbage collector happens to run (it does not count tensor memory):
        measured, a 200-architecture NAS-Bench-201 scoring run grew to 24 GB
        after 23 architectures and was killed.
        """
        for rec in self.records:
            rec.out_specs = []
            rec.saved = None
            rec.gouts = {}
            rec.graph = None  # the call's autograd nodes, which hold the prehooks
            rec.guards = None
        self.records = []
        self.roots = []
        self.node_roots = []

    def _make_hook(self, mname, base_rule, attrs):
        def hook(mod, args, kwargs, out):
            if not self.active:
                return None
            tensors = graph.tensors(out)
            k = self.calls_seen.get(mname, 0)
            self.calls_seen[mname] = k + 1
            pos = graph.hooked_outputs(tensors)
            rule, dims = self.route(mname, k, mod, base_rule, args, kwargs, out, tensors, pos,
                                    self.n)  # fmt: skip
            if rule is WHOLE:
                return None
            # Rules see detached inputs (same storage, no autograd history), so the
            # kernel never joins the graph, whatever requires grad upstream.
            dargs, dkwargs = graph.detach((args, kwargs))
            if rule is not None:
                ctx = Context(self.call.bn, self.call.backend, self.call.workspace, tuple(attrs))
                saved = rule.save(mod, dargs, dkwargs, out, ctx)
            else:
                saved = (dargs, dkwargs)
            rec = Record(len(self.records), mname, mod, rule, attrs, saved, self.n, dims=dims)
            rec.graph = (
                [t.grad_fn for t in tensors if t.grad_fn is not None],
                [t.grad_fn for t in graph.tensors((args, kwargs)) if t.grad_fn is not None],
            )
            self.records.append(rec)
            if rule is not None:
                guards = rule.guards(mod, args, kwargs, out)
                if guards:  # the strategy checks them against the graph after the forward
                    gpos = [next(i for i, t in enumerate(tensors) if t is g) for g in guards]
                    rec.guards = (guards, (dargs, dkwargs), gpos)
                    for t in guards:
                        t.grad_fn.metadata[GUARD_KEY] = (id(self), rec.index)
            if not any(t.requires_grad for t in graph.tensors((args, kwargs))):
                # Nothing upstream requires grad (first layer of token models, a
                # layer on constants): drive the backward to its parameters too.
                params = self.call.copies.params
                self.roots.extend(params[p] for p in attrs.values() if params[p].requires_grad)
            pos = pos if rule is None else pos[:1]
            outs = [tensors[i] for i in pos]
            rec.out_pos = pos
            result = None
            fed = graph.fed_outputs(outs, graph.tensors((args, kwargs))) if len(outs) > 1 else []
            if fed:  # the rest of the model gets copies: their nodes see its gradient alone
                copies = {id(outs[j]): outs[j].clone() for j in fed}
                outs = [copies.get(id(t), t) for t in outs]
                result = graph.map_tensors(out, lambda t: copies.get(id(t), t))
            rec.out_specs = [(t.shape, t.dtype, t.device) for t in outs]
            for j, t in enumerate(outs):
                t.grad_fn.register_prehook(self._make_prehook(rec, j, t.output_nr))
            return result

        return hook

    # -- the routes the strategy gives after the forward ----------------------
    def guards_reached(self, y: torch.Tensor) -> set[int]:
        """Indices of the records with a guard output (GramRule.guards) that reaches ``y``;
        the guards' marks are removed."""
        guarded = [r for r in self.records if r.guards is not None]
        if not guarded:
            return set()
        reached = set()
        for node in graph.graph_nodes(y):
            mark = node.metadata.get(GUARD_KEY)
            if mark is not None and mark[0] == id(self):
                reached.add(mark[1])
        for rec in guarded:
            for t in rec.guards[0]:
                t.grad_fn.metadata.pop(GUARD_KEY, None)
        return reached

    def to_fallback(self, rec: Record) -> None:
        """``rec`` leaves its rule for the per-module fallback, with its guard outputs'
        gradients hooked too."""
        tensors, fallback_saved, gpos = rec.guards
        rec.rule, rec.saved = None, fallback_saved
        rec.out_pos = rec.out_pos + gpos
        for t in tensors:
            rec.out_specs.append((t.shape, t.dtype, t.device))
            t.grad_fn.register_prehook(self._make_prehook(rec, len(rec.out_specs) - 1, t.output_nr))

    def adopt(self, rec: Record, extra: dict[str, str]) -> None:
        """``rec``'s call also takes the parameters ``extra`` (attribute -> name)."""
        rec.attrs = {**rec.attrs, **extra}

    def exclude(self, pnames: set[str]) -> None:
        """Parameters ``pnames`` go to the whole-model fallback."""
        self.excluded = set(pnames)

    def defer(self, pnames: set[str]) -> None:
        """Parameters ``pnames`` get their blocks after all passes (several uses summed)."""
        self.deferred_params |= pnames

    def add_node_rule(
        self, pname: str, node: Any, index: int, rule: GramRule, saved: Any, n: int
    ) -> None:
        """Parameter ``pname``, used once by autograd node ``node`` (its input ``index``),
        takes the node rule ``rule`` there (``rules.nodes``): a record of its own, hooked on
        that node, instead of any other route."""
        p = self.call.copies.params[pname]
        mname, module, attr = self.call.plan.owners[pname][0]
        takers = [r for r in self.records if pname in r.attrs.values()
                  and r.index not in self._node_records]  # fmt: skip
        rec = Record(len(self.records), mname, module, rule, {attr: pname}, saved, n)
        out = tuple(node._input_metadata[0].shape)
        rec.out_specs = [(torch.Size(out), p.dtype, p.device)]
        self.records.append(rec)
        self._node_records.add(rec.index)
        node.register_prehook(self._make_prehook(rec, 0, 0))
        root = rule.root(saved, p)  # the backward must run the node
        if root is p:
            self.node_roots.append((node, index, p))
        else:
            self.roots.append(root)
        self.excluded.discard(pname)
        self.node_rules[pname] = type(rule).__name__
        for fb in takers:  # its module's fallback no longer takes it
            fb.attrs = {a: q for a, q in fb.attrs.items() if q != pname}

    def backward_roots(self, xp: torch.Tensor) -> list[Any]:
        """What the backward differentiates for (each once): the prepared input, where it
        requires grad, the parameters no input leads to (a first layer, a node rule's node
        with no other way in), the sample-free subgraphs' edges, the whole-model fallback's
        parameters."""
        roots = ([xp] if xp.requires_grad else []) + self.roots
        roots += [self.call.copies.params[p] for p in self.excluded]
        return list({id(t): t for t in roots}.values())

    def settle_node_roots(self, consumers: graph.Consumers, xp: torch.Tensor) -> None:
        """The node rules' parameters that must be roots of the backward, for it to run
        their nodes: those whose node has no other input leading to a root. A node that
        runs anyway skips its parameter's summed gradient (the weight gradient of a
        matmul: Swin's attention projections). Once the classification has settled the
        other roots; ``consumers``: the forward's graph."""

        def leads_to(node: Any, index: int, reach: set[int]) -> bool:  # by another input
            return any(f is not None and j != index and id(f) in reach
                       for j, (f, _) in enumerate(node.next_functions))  # fmt: skip

        pending = self.node_roots
        while pending:
            reach = consumers.reaching(self.backward_roots(xp))
            pending = [(node, i, p) for node, i, p in pending if not leads_to(node, i, reach)]
            # the lowest of them (none of their other inputs leads to another) take their
            # parameters as roots; a node above one of them then runs without its own
            below = consumers.reaching([node for node, _, _ in pending])
            lowest = {id(node) for node, i, _ in pending if not leads_to(node, i, below)}
            lowest = lowest or {id(node) for node, _, _ in pending}  # (a DAG has a lowest)
            self.roots += [p for node, _, p in pending if id(node) in lowest]
            pending = [u for u in pending if id(u[0]) not in lowest]
        self.node_roots = []

    def drop_graphs(self) -> None:
        """Forget the calls' autograd nodes (the classification's walks are done)."""
        for rec in self.records:
            rec.graph = None
            rec.guards = None

    def _make_prehook(self, rec: Record, j: int, output_nr: int):
        def prehook(grad_outputs):
            g = grad_outputs[output_nr]
            if g is None:
                return None
            if rec.rule is None:
                rec.gouts.setdefault(self.pass_idx, [None] * len(rec.out_specs))[j] = g
            elif self.batch_passes or all(p in self.deferred_params for p in rec.attrs.values()):
                rec.gouts[self.pass_idx] = g
            else:
                self._immediate(rec, g)
            return None

        return prehook

    def _ranges(self, rec: Record, pname: str, per_sample: int = 1) -> list[tuple[int, int]]:
        """The row ranges [r0, r1) of parameter ``pname`` whose blocks ``rec``'s rule makes
        one at a time, ``per_sample`` rows per sample each (``"full"``: one per pass): the
        plan's block budget within the rule's own cap (``GramRule.block_cap``)."""
        return self.call.plan.row_ranges(
            self.call.copies.params[pname],
            rec.rule,
            per_sample,
            rec.rule.block_cap(rec.module, rec.saved),
        )

    def _immediate(self, rec: Record, g: torch.Tensor) -> None:
        deferred = False
        for attr, pname in rec.attrs.items():
            if pname in self.excluded:
                continue
            if pname in self.deferred_params:
                deferred = True
                continue
            for r0, r1 in self._ranges(rec, pname):
                kw = {}
                if rec.rule.supports_out:
                    p = self.call.copies.params[pname]
                    shape = (g.shape[0], p.numel() // rows_of(p) * (r1 - r0))
                    if self.streams(math.prod(shape) * p.element_size()):
                        kw["out"] = self.call.workspace.get("engine.block", shape, p)
                with phase("per_sample"):
                    blk = rec.rule.grad_rows(rec.module, rec.saved, g, attr, r0, r1, **kw)
                self.consume((pname, r0, self.pass_idx), blk)
        if deferred:
            rec.gouts[self.pass_idx] = g
        elif self.pass_idx == self.npasses - 1:
            rec.saved = None  # last use of this layer's input: let autograd free it

    # -- after the backward passes -------------------------------------------
    def flush_batched(self) -> None:
        """Blocks of single-use rule parameters whose gradients were kept for all passes."""
        for rec in self.records:
            if rec.rule is None or not rec.gouts:
                continue
            ks = sorted(rec.gouts)
            gs = [rec.gouts[k] for k in ks]
            for attr, pname in rec.attrs.items():
                if pname in self.excluded or pname in self.deferred_params:
                    continue
                for r0, r1 in self._ranges(rec, pname):
                    with phase("per_sample"):
                        blocks = rec.rule.grad_rows_multi(rec.module, rec.saved, gs, attr, r0, r1)
                    for k, blk in zip(ks, blocks, strict=True):
                        self.consume((pname, r0, k), blk)
            if not any(p in self.deferred_params for p in rec.attrs.values()):
                rec.gouts = {}
                rec.saved = None

    def flush_deferred(self, npasses: int, full: bool) -> None:
        """Blocks of parameters used several times, fallback modules, and "full" mode."""
        uses: dict[str, list[tuple[Record, str]]] = defaultdict(list)
        for rec in self.records:
            for attr, pname in rec.attrs.items():
                if pname not in self.excluded:
                    uses[pname].append((rec, attr))
        fb_cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for pname, lst in uses.items():
            if pname not in self.deferred_params and all(r.rule is not None for r, _ in lst):
                continue
            rows_ok = all(r.rule is not None and r.rule.supports_rows for r, _ in lst)
            first = lst[0][0]
            n = first.n
            ranges = (
                self._ranges(first, pname, npasses if full else 1)
                if rows_ok
                else [(0, rows_of(self.call.copies.params[pname]))]
            )
            for r0, r1 in ranges:
                per_pass = []
                for k in range(npasses):
                    parts = []
                    for rec, attr in lst:
                        if k not in rec.gouts:
                            continue
                        if rec.rule is None:
                            key = (rec.index, k)
                            if key not in fb_cache:
                                with phase("fallback"):
                                    fb_cache[key] = self.module_grads(rec, rec.gouts[k])
                            G = fb_cache[key][attr]
                            parts.append(Dense(G.reshape(G.shape[0], -1)))
                        else:
                            with phase("per_sample"):
                                blk = rec.rule.grad_rows(
                                    rec.module, rec.saved, rec.gouts[k], attr, r0, r1
                                )
                            parts.append(blk)
                    if not parts:  # this use got no gradient in pass k: a zero block
                        p = self.call.copies.params[pname]
                        width = p.numel() // max(1, p.shape[0] if p.dim() else 1) * (r1 - r0)
                        z = torch.zeros(n, width, dtype=self.call.dtype, device=self.call.device)
                        parts = [Dense(z)]
                    per_pass.append(add_blocks(parts))
                if full:
                    self.consume((pname, r0, 0), cat_blocks(per_pass))
                else:
                    for k, blk in enumerate(per_pass):
                        self.consume((pname, r0, k), blk)


def rows_of(p: torch.Tensor) -> int:
    return p.shape[0] if p.dim() else 1


# autograd-node metadata key marking a rule's guard outputs: (capture id, record index)
GUARD_KEY = "fastntk.guard"


def batch_dim(module: nn.Module) -> int:
    """Batch dimension of a module's tensors: 1 for sequence-first modules (MHA & co)."""
    return 1 if getattr(module, "batch_first", True) is False else 0
