"""Which route each module call and each parameter of a chunk takes.

During the forward, :class:`Router` gives each call its route from the call's measured
sample dims (fixed by the first chunk that makes the call) and its rule: the rule, the
per-module fallback, or none (the whole-model fallback takes its parameters). After the
forward, :class:`Classifier` routes the parameters from the chunk's records and the
autograd graph of its output, once by the first chunk for all: a rule whose guard outputs
reach the output gives way to the fallback, parameters of never-called modules join an
ancestor's call, a parameter that no module rule serves takes a node rule
(``rules.nodes``) where one autograd node uses it simply, other uses outside module calls
the whole-model fallback, and a parameter used several times has its uses summed after
the passes. The capture carries
the routes out; it decides none.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn as nn

from fastntk import _model
from fastntk.engine import capture, graph, probe
from fastntk.engine.call import Call
from fastntk.errors import UnsupportedError
from fastntk.rules import GramRule, nodes


class SamplesCoupled(Exception):
    """The probe found the samples coupled inside the model (the message says how): the
    layerwise paths do not apply."""


class Router:
    """The route of each module call during a chunk's forward (:data:`capture.Route`)."""

    def __init__(self, call: Call):
        self.call = call
        self.probe: probe.Probe | None = None  # the first chunk's probe (set when made)
        self._call_dims: dict[tuple[str, int], probe.CallDims | None] = {}
        self.unbatched_calls: set[str] = set()  # modules with a call the probe sent whole

    def __call__(
        self, mname: str, k: int, mod: nn.Module, rule: GramRule | None, args, kwargs, out,
        tensors: list[torch.Tensor], pos: list[int], n: int,
    ) -> tuple[GramRule | None | str, probe.CallDims | None]:  # fmt: skip
        """(the rule ``mname``'s ``k``-th call takes, None for the per-module fallback, or
        :data:`capture.WHOLE`; its measured sample dims). ``rule``: the module's planned
        rule; ``pos``: the positions of the call's hooked outputs in ``tensors``."""
        dims = self.call_dims(mname, k, args, kwargs, tensors, n)
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
            layout = call_layout(dims, pos, capture.batch_dim(mod), rule is not None)
            if layout == "whole":
                # no sample dim to read per-sample gradients off (a module on a
                # learned query, a weight parametrization) or mixed samples: its
                # parameters go to the whole-model fallback (uses > calls)
                self.unbatched_calls.add(mname)
                return capture.WHOLE, dims
            if layout == "fallback":
                rule = None  # laid out otherwise than the rule assumes
        if rule is not None and not rule.accepts(mod, args, kwargs, out):
            rule = None  # this call takes the per-module fallback (see GramRule.accepts)
        return rule, dims

    def call_dims(self, mname, k, args, kwargs, tensors, n) -> probe.CallDims | None:
        """Measured sample dims of ``mname``'s ``k``-th call, fixed by the first chunk
        that makes it (every chunk must serve a call alike: their blocks meet by key)."""
        key = (mname, k)
        if key not in self._call_dims:
            self._call_dims[key] = (
                None
                if self.probe is None
                else self.probe.dims(
                    mname,
                    k,
                    probe.shapes(graph.flatten((args, kwargs))[0]),
                    probe.shapes(tensors),
                    n,
                )
            )
        return self._call_dims[key]


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


class Classifier:
    """The first chunk's decisions (parameters outside module calls, adopted parameters,
    node rules), applied to every chunk of a call."""

    def __init__(self, call: Call):
        self.call = call
        self.untracked: set[str] | None = None  # whole-model fallback (None: no chunk yet)
        # parameter -> (ancestor module name, attribute path relative to it): _adoptions
        self.adopted: dict[str, tuple[str, str]] = {}
        self._first_calls: dict[str, int] = {}
        self._node_ok: dict[str, bool] = {}  # parameter -> takes its node rule

    def classify(
        self, cap: capture.Capture, y: torch.Tensor, pr: probe.Probe | None, xp: torch.Tensor
    ) -> None:
        """Route the parameters of the chunk ``cap`` recorded, whose output is ``y``, of the
        prepared input ``xp`` (module docstring); ``pr``: the probe (None where it could
        not run)."""
        walk = _Walk(y)  # (one walk of y's graph for the steps below that need one)
        reached = cap.guards_reached(y)
        for rec in cap.records:
            if rec.index in reached:
                cap.to_fallback(rec)
        if self.untracked is None:
            if pr is not None:
                coupled = pr.coupled(y)
            else:  # the model ran on the chunk but not on one or two of its samples (it
                coupled = (  # groups them, say): independence unchecked, so not assumed
                    "the model does not run on one or two samples, so their independence "
                    "could not be checked"
                )
            if coupled is not None:
                raise SamplesCoupled(coupled)
            self._first_calls = calls(cap)
            self.untracked, self.adopted = self._outside_uses(cap, walk, self._first_calls)
        elif (now := calls(cap)) != self._first_calls:
            # this chunk calls the modules otherwise than the first (a forward that
            # branches on the batch size, data-dependent calls): its parameters must be
            # served as the first chunk's were, or their blocks would not meet
            untracked, adopted = self._outside_uses(cap, walk, now)
            changed = sorted((untracked ^ self.untracked) | (set(adopted) ^ set(self.adopted)))
            if changed:
                raise UnsupportedError(
                    f"the model uses {', '.join(changed)} inside and outside its module's call "
                    f"in different chunks (a chunk of {cap.n} samples against the first one): "
                    "its forward depends on the batch. Pass chunk_size >= the number of "
                    "samples (one chunk), or use method='vmap'"
                )
        for rec in cap.records:  # adopted parameters join their ancestor's call
            extra = {a: p for p, (mn, a) in self.adopted.items() if mn == rec.mname}
            if extra:
                cap.adopt(rec, extra)
        cap.exclude(self.untracked)
        self._node_rules(cap, y, walk, pr)
        if cap.node_roots:  # (node rules were added: the walk is made)
            cap.settle_node_roots(walk(), xp)
        cap.defer({p for p, c in calls(cap).items() if c > 1 and p not in cap.excluded})
        cap.drop_graphs()

    def _node_rules(
        self, cap: capture.Capture, y: torch.Tensor, walk: _Walk, pr: probe.Probe | None
    ) -> None:
        """Parameters that no module rule serves (used outside module calls, or a direct
        parameter of a module without a rule: a layer scale, a hand-written norm, HF's
        ``Conv1D``) and that one autograd node uses as a node rule understands
        (:mod:`fastntk.rules.nodes`): hook that node instead of the whole-model or
        per-module fallback. The first chunk decides, with the probe, whether the node has
        the samples in dim 0 (or in sample-major blocks of rows); every chunk then serves
        the parameter alike where its own node matches."""
        params = self.call.copies.params
        by_fallback: dict[str, list[capture.Record]] = defaultdict(list)
        for rec in cap.records:
            for q in rec.attrs.values():
                by_fallback[q].append(rec)
        candidates = set(cap.excluded) | {
            q for q, recs in by_fallback.items() if len(recs) == 1 and recs[0].rule is None
        }
        if not candidates:
            return
        consumers = walk()
        uses = consumers.params({q: params[q] for q in candidates})
        owners = self.call.plan.owners
        n = y.shape[0]
        for pname, lst in uses.items():
            if len(lst) != 1 or len(owners.get(pname, ())) != 1:
                continue
            uses = nodes.resolve(lst[0], params[pname], consumers, n)
            found = [nodes.find(u, n) for u in uses or []]
            if not found or None in found:
                continue
            if pname not in self._node_ok:  # decided by the first chunk, for all
                self._node_ok[pname] = _confirmed(pr, pname, uses, found, n)
            if self._node_ok[pname]:  # (several exits: the uses' blocks are summed)
                for use, (rule, saved) in zip(uses, found, strict=True):
                    cap.add_node_rule(pname, use.node, use.index, rule, saved, n)
        if pr is not None:
            pr.drop_graph()

    def _outside_uses(self, cap: capture.Capture, walk: _Walk, calls: dict[str, int]):
        """(parameters used outside their modules' calls: the whole-model fallback,
        parameters of never-called modules an ancestor's call takes: _adoptions)."""
        params = self.call.copies.params
        consumers = walk().params({q: params[q] for q in self.call.selected})
        uses = {p: len(v) for p, v in consumers.items()}
        untracked = {p for p, c in uses.items() if c > calls.get(p, 0)}
        untracked |= self._uses_outside_calls(cap, consumers, calls)
        adopted = self._adoptions(cap, uses, calls)
        return untracked - set(adopted), adopted

    def _uses_outside_calls(
        self, cap: capture.Capture, consumers, calls: dict[str, int]
    ) -> set[str]:
        """Parameters with a use outside every call of their modules, though counted no
        more often than those calls (a parameter its module holds but only the parent
        uses: ``self.h(self.b(x) * self.b.gamma)``; the module's fallback would re-run a
        forward without it). A use is inside a call when the autograd graph reaches it
        from the call's outputs without passing the call's inputs. ``consumers`` (the
        uses in the graph of the output, from :meth:`graph.Consumers.params`) holds their
        nodes alive, so node identities compare across the walks."""
        params = self.call.copies.params
        inside: dict[str, set[tuple[int, int]]] = defaultdict(set)
        for rec in cap.records:
            want = {id(params[p]): p for p in rec.attrs.values()}
            if rec.graph is None or not want:
                continue
            outs, ins = rec.graph
            stop = {id(node) for node in ins}
            seen: dict[int, Any] = {}  # (alive while the walk lasts: _graph_nodes)
            stack = list(outs)
            while stack:
                node = stack.pop()
                if node is None or id(node) in seen or id(node) in stop:
                    continue
                seen[id(node)] = node
                for i, (nxt, _) in enumerate(getattr(node, "next_functions", ())):
                    var = getattr(nxt, "variable", None)
                    if var is not None:
                        if id(var) in want:
                            inside[want[id(var)]].add((id(node), i))
                    elif nxt is not None:
                        stack.append(nxt)
        return {
            p for p, lst in consumers.items()
            if calls.get(p, 0) and any((id(node), i) not in inside[p] for node, i in lst)
        }  # fmt: skip

    def _adoptions(
        self, cap: capture.Capture, uses: dict[str, int], calls: dict[str, int]
    ) -> dict[str, tuple[str, str]]:
        """Parameters of never-called submodules that an ancestor's call can take.

        ``nn.MultiheadAttention`` applies ``out_proj``'s weight with ``F.linear`` and never
        calls ``out_proj``: its parameters are used inside the attention module's own call.
        When a parameter's only owner module is never called, the nearest called ancestor
        is called exactly as often as the parameter is used, and each of its calls can
        take the parameter (the per-module fallback always can; a rule can when its
        ``param_names`` list the attribute path, as ``MultiheadAttentionRule`` lists
        ``out_proj.weight``), the ancestor's records compute its per-sample gradients too
        (instead of a whole-model fallback). Returns
        ``{param: (ancestor module name, attribute path relative to it)}``.
        """
        owners = self.call.plan.owners
        by_module: dict[str, list[capture.Record]] = defaultdict(list)
        for rec in cap.records:
            by_module[rec.mname].append(rec)
        out: dict[str, tuple[str, str]] = {}
        for pname, n_uses in uses.items():
            if calls.get(pname, 0) or len(owners.get(pname, ())) != 1:
                continue
            mname, _, attr = owners[pname][0]
            if mname in by_module:
                continue
            parts = mname.split(".") if mname else []
            for i in range(len(parts) - 1, -1, -1):
                anc = ".".join(parts[:i])
                if anc in by_module:
                    rel = ".".join(parts[i:] + [attr])
                    recs = by_module[anc]
                    takes = all(r.rule is None or rel in r.rule.param_names for r in recs)
                    if len(recs) == n_uses and takes:
                        out[pname] = (anc, rel)
                    break
        return out


class _Walk:
    """The :class:`graph.Consumers` of ``y``'s graph, made when first asked (a chunk whose
    classification needs no walk makes none) and held until the classification ends."""

    def __init__(self, y: torch.Tensor):
        self.y: torch.Tensor | None = y
        self.consumers: graph.Consumers | None = None

    def __call__(self) -> graph.Consumers:
        if self.consumers is None:
            assert self.y is not None
            self.consumers, self.y = graph.Consumers(self.y), None
        return self.consumers


def calls(cap: capture.Capture) -> dict[str, int]:
    """Canonical parameter name -> the calls of the chunk that take it."""
    out: dict[str, int] = defaultdict(int)
    for rec in cap.records:
        for pname in rec.attrs.values():
            out[pname] += 1
    return out


def _confirmed(pr, pname, uses, found, n) -> bool:
    """Whether the probe confirms the layout the node rules assume for ``pname``'s nodes:
    the samples in dim 0 of each node's output, or (merged rows) in sample-major blocks,
    the probe's rows for its samples being the chunk's rows of those samples; a sample-free
    subgraph before the nodes of the same shapes in both. Without a probe the samples are
    assumed in dim 0, as for module calls; merged rows and sample-free subgraphs are then
    refused."""
    if pr is None:
        return all(rule.rows_per_sample(saved) == 1 and not u.chain
                   for u, (rule, saved) in zip(uses, found, strict=True))  # fmt: skip

    def at_probe(lst, consumers):
        if len(lst) != 1:
            return False
        small = nodes.resolve(lst[0], pr.params[pname], consumers, pr.q)
        if small is None or len(small) != len(uses):
            return False
        for use, (rule, saved), u in zip(uses, found, small, strict=True):
            if u.node.name() != use.node.name() or u.chain_shapes != use.chain_shapes:
                return False  # (a sample-free subgraph's tensors: the same in both)
            if rule.rows_per_sample(saved) == 1:
                if probe.sample_dim(use.out, u.out, n, pr.q) != 0:
                    return False
                continue
            at_q = rule.match(u, pr.q)
            rows, probe_rows = rule.rows_input(saved), at_q and rule.rows_input(at_q)
            if rows is None or probe_rows is None:
                return False
            if not nodes.sample_major(rows, probe_rows, n, pr.q, probe.tolerance(rows)):
                return False
        return True

    return bool(pr.node_use(pname, at_probe))
