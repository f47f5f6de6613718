"""Capture: forward hooks keep each planned module call's inputs, autograd-node hooks
deliver its output gradients during the backward, and the call's rule turns both into
per-sample gradient blocks handed to the consumer (the Gram accumulation, a panel, the
sketch). The hooks read the job's plan and probe; the routing decisions are theirs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from fastntk import _model
from fastntk.engine import graph, probe
from fastntk.profiling import phase
from fastntk.rules import Block, Context, Dense, GramRule, add_blocks, cat_blocks


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


class Capture:
    """Hooks of one forward/backward; routes gradient blocks to ``consume``."""

    def __init__(self, job: Any):
        self.job = job  # the layerwise strategy (its probe's dims, row ranges, fallback)
        self.call = job.call
        self.records: list[Record] = []
        self.roots: list[torch.Tensor] = []
        self.active = False
        self.pass_idx = 0
        self.deferred_params: set[str] = set()  # processed after all passes
        self.excluded: set[str] = set()  # handled by the whole-model fallback
        self.broadcast: set[str] = set()  # batch-broadcast parameters (rules.broadcast)
        self.consume: Callable[[tuple, Block], None] | None = None
        # whether ``consume`` is done with a block of this many bytes when it returns (then
        # rules may write it into reused workspace memory)
        self.streams: Callable[[int], bool] = never
        self.handles: list[Any] = []
        self.calls_seen: dict[str, int] = {}  # module name -> calls so far (probe keys)
        self.n = 0  # samples of this chunk
        self.npasses = 1
        # trace/mean with small enough output gradients: keep every logit's gradients
        # and hand them to the rules together (shared patches, bigger GEMMs)
        self.batch_passes = False

    # -- forward -----------------------------------------------------------
    def install(self) -> None:
        for route in self.call.plan.routes:
            mname, module, attrs, rule = (
                route.module_name,
                route.module,
                dict(route.attrs),
                route.rule,
            )
            # prepend: before the user's own forward hooks, which may return a changed
            # output (3 * out): the rules need the module's own output and its gradient
            h = module.register_forward_hook(
                self._make_hook(mname, rule, attrs), with_kwargs=True, prepend=True
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
        self.records = []
        self.roots = []

    def _make_hook(self, mname, base_rule, attrs):
        def hook(mod, args, kwargs, out):
            if not self.active:
                return None
            tensors = graph.tensors(out)
            k = self.calls_seen.get(mname, 0)
            self.calls_seen[mname] = k + 1
            dims = self.job.call_dims(mname, k, args, kwargs, tensors, self.n)
            pos = graph.hooked_outputs(tensors)
            rule = base_rule
            if (
                dims is not None
                and self.call.bn == "per_sample"
                and isinstance(mod, nn.modules.batchnorm._BatchNorm)
                and (dims.ins[0] if dims.ins else None) != 0
            ):
                raise _model.MergedSamplesError(
                    f"{mname!r} is given its samples in another dim than its rows (or none)"
                )
            if dims is not None:
                layout = call_layout(dims, pos, batch_dim(mod), rule is not None)
                if layout == "whole":
                    # no sample dim to read per-sample gradients off (a module on a
                    # learned query, a weight parametrization) or mixed samples: its
                    # parameters go to the whole-model fallback (uses > calls)
                    self.job.unbatched_calls.add(mname)
                    return None
                if layout == "fallback":
                    rule = None  # laid out otherwise than the rule assumes
            n = self.n
            # Rules see detached inputs (same storage, no autograd history), so the
            # kernel never joins the graph, whatever requires grad upstream.
            dargs, dkwargs = graph.detach((args, kwargs))
            if rule is not None and not rule.accepts(mod, args, kwargs, out):
                rule = None  # this call takes the per-module fallback (see GramRule.accepts)
            if rule is not None:
                ctx = Context(self.call.bn, self.call.backend, self.call.workspace, tuple(attrs))
                saved = rule.save(mod, dargs, dkwargs, out, ctx)
            else:
                saved = (dargs, dkwargs)
            rec = Record(len(self.records), mname, mod, rule, attrs, saved, n, dims=dims)
            rec.graph = (
                [t.grad_fn for t in tensors if t.grad_fn is not None],
                [t.grad_fn for t in graph.tensors((args, kwargs)) if t.grad_fn is not None],
            )
            self.records.append(rec)
            if rule is not None:
                guards = rule.guards(mod, args, kwargs, out)
                if guards:  # checked against the graph after the forward (check_guards)
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

    def check_guards(self, y: torch.Tensor) -> None:
        """Records whose guard outputs (GramRule.guards) reach ``y`` leave their rule for
        the exact per-module fallback, with every output's gradient hooked."""
        guarded = [r for r in self.records if r.guards is not None]
        if not guarded:
            return
        reached = set()
        for node in graph.graph_nodes(y):
            mark = node.metadata.get(GUARD_KEY)
            if mark is not None and mark[0] == id(self):
                reached.add(mark[1])
        for rec in guarded:
            tensors, fallback_saved, gpos = rec.guards
            for t in tensors:
                t.grad_fn.metadata.pop(GUARD_KEY, None)
            rec.guards = None
            if rec.index not in reached:
                continue
            rec.rule, rec.saved = None, fallback_saved
            rec.out_pos = rec.out_pos + gpos
            for t in tensors:
                rec.out_specs.append((t.shape, t.dtype, t.device))
                t.grad_fn.register_prehook(
                    self._make_prehook(rec, len(rec.out_specs) - 1, t.output_nr)
                )

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

    def _immediate(self, rec: Record, g: torch.Tensor) -> None:
        deferred = False
        for attr, pname in rec.attrs.items():
            if pname in self.excluded:
                continue
            if pname in self.deferred_params:
                deferred = True
                continue
            for r0, r1 in self.job.row_ranges(pname, rec.rule, 1):
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
                for r0, r1 in self.job.row_ranges(pname, rec.rule, 1):
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
            n = lst[0][0].n
            ranges = (
                self.job.row_ranges(pname, lst[0][0].rule, npasses if full else 1)
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
                                    fb_cache[key] = self.job.module_grads(rec, rec.gouts[k])
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


def _broadcast_rule() -> GramRule:
    from fastntk.rules.broadcast import BroadcastRule

    return BroadcastRule()


BROADCAST_RULE = _broadcast_rule()


def never(nbytes: int) -> bool:
    return False


def always(nbytes: int) -> bool:
    return True


def rows_of(p: torch.Tensor) -> int:
    return p.shape[0] if p.dim() else 1


class SamplesCoupled(Exception):
    """The probe found the samples coupled inside the model (the message says how): the
    layerwise paths do not apply."""


# autograd-node metadata key marking a rule's guard outputs: (capture id, record index)
GUARD_KEY = "fastntk.guard"


def batch_dim(module: nn.Module) -> int:
    """Batch dimension of a module's tensors: 1 for sequence-first modules (MHA & co)."""
    return 1 if getattr(module, "batch_first", True) is False else 0


def call_layout(dims: probe.CallDims, pos: list[int], bdim: int, rule: bool) -> str:
    """How one call can be served, given its measured sample dims (:mod:`fastntk.engine.probe`)
    and the positions of its hooked outputs: ``"rule"`` (a rule's call laid out as rules
    assume: the first tensor input and the output batched in ``bdim``; the rule reads its
    other inputs itself, e.g. MHA's (N·heads, T, S) masks), ``"fallback"`` (the
    per-module fallback with the measured dims), ``"whole"`` (no per-module handling: an
    output without a sample dim, or a tensor whose samples mix)."""
    if not pos:
        return "rule" if rule else "fallback"  # no gradient reaches this call's outputs
    outs = [dims.outs[i] for i in pos]
    first_in = next((d for d in dims.ins if d is not None), bdim)
    if rule and outs[0] == bdim and first_in == bdim:
        return "rule"
    if any(d is None or d == probe.AMBIGUOUS for d in outs) or probe.AMBIGUOUS in dims.ins:
        return "whole"
    return "fallback"
