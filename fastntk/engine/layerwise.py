"""The layerwise strategy: per-sample gradient blocks layer by layer, one chunk of samples
at a time (a forward, one backward per pass; :mod:`.capture` hands each layer's blocks to
the consumer during the backward), contracted into the kernel by :mod:`.gram` (one chunk)
or :mod:`.panels` (several). :meth:`Layerwise.routes` runs the first half of a chunk, the
probe, forward and classification, alone: the routes ``fastntk.explain`` prints."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from fastntk import _model
from fastntk.engine import capture, classify, fallback, gram, graph, panels, probe, sizes
from fastntk.engine.call import Call
from fastntk.profiling import phase
from fastntk.rules import Block


@dataclass(frozen=True)
class CallRoute:
    """One module call of a chunk, as classified: its rule (the rule class's name; None:
    the per-module fallback) and the parameters it takes."""

    module_name: str
    rule: str | None
    params: tuple[str, ...]


@dataclass(frozen=True)
class Routes:
    """The routes the first chunk of a call decides for every chunk
    (:meth:`Layerwise.routes`; parameter names are canonical)."""

    K: int  # the model's outputs per sample
    calls: tuple[CallRoute, ...]  # each module call (and node rule), in forward order
    excluded: frozenset[str]  # parameters the whole-model fallback takes
    unbatched: frozenset[str]  # modules with a call without a sample dim (sent whole)
    node_rules: Mapping[str, str]  # parameter -> the node rule serving it (rules.nodes)
    adopted: Mapping[str, str]  # parameter of a never-called module -> the ancestor taking it
    deferred: frozenset[str]  # parameters used several times (uses summed after the passes)
    reached: frozenset[str]  # parameters used in the output's graph
    activation_bytes: int  # the chunk's saved inputs and hooked outputs
    coupled: str | None = None  # the probe found the samples coupled: how (calls partial)


class Layerwise:
    """The layerwise strategy of one call: the probe of its first chunk and the routes
    that chunk decides for all (:mod:`.classify`: each module call's, by ``router``
    during the forward; the parameters', by ``classifier`` after it)."""

    def __init__(self, call: Call):
        self.call = call
        self.probe: probe.Probe | None = None  # measured sample dims (run_probe)
        self._probed = False
        self.router = classify.Router(call)
        self.classifier = classify.Classifier(call)

    def kernel(self, x1: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
        """Θ(x1, x2): one chunk of every sample where it fits, else panels."""
        call = self.call
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        if x2 is None and n1 <= call.samples:
            acc = gram.GramAccumulator(call, n1, n1, None)
            K = self.run_chunk(x1, acc.add, acc.streams)
            return call.head.finish(acc.result(call.head.rows(K)), n1, n1, K)
        if x2 is not None and n1 + n2 <= call.samples:
            acc = gram.GramAccumulator(call, n1, n2, n1)
            K = self.run_chunk(torch.cat([x1, x2]), acc.add, acc.streams)
            return call.head.finish(acc.result(call.head.rows(K)), n1, n2, K)
        return panels.kernel(self, x1, x2)

    def run_probe(self, x: torch.Tensor) -> None:
        """The probe for the call's first chunk ``x``, once (:mod:`fastntk.engine.probe`)."""
        if not self._probed:
            self._probed = True
            call = self.call
            with phase("probe"):
                self.probe = probe.run(
                    functools.partial(_probe_forward, call),  # not a bound method: the
                    # probe keeps its forward, and a probe holding this object is a cycle
                    [(r.module_name, r.module) for r in call.plan.routes],
                    x,
                    {q: call.copies.params[q] for q in call.selected},
                    # parameters of modules without a rule: node-rule candidates, which
                    # the classification confirms on the probe's graph
                    keep_graph=any(r.rule is None for r in call.plan.routes),
                )
            self.router.probe = self.probe

    def run_chunk(
        self,
        x: torch.Tensor,
        consume: Callable[[tuple, Block], None],
        streams: Callable[[int], bool] = capture.never,
    ) -> int:
        """Forward + one backward per pass on chunk ``x``; feeds blocks to ``consume``.

        ``streams(nbytes)``: whether ``consume`` has finished with a block of that size
        when it returns (never keeps it), so that the block may live in reused memory.
        Returns K, the model's outputs per sample (``y.shape[1]``).
        """
        call = self.call
        self.run_probe(x)
        cap = capture.Capture(
            call,
            self.router,
            lambda rec, gouts: fallback.module_grads(call, rec, gouts),
            x.shape[0],
            consume,
            streams,
        )
        cap.install()
        try:
            xp, y, coupled = self._forward_and_classify(cap, x)
            if coupled is not None:
                raise classify.SamplesCoupled(coupled)
            npasses = self._backward(cap, xp, y)
        finally:
            cap.active = False
            cap.remove()
            cap.release()
        if cap.excluded:
            fallback.model_blocks(call, x, consume, sorted(cap.excluded), npasses)
        return y.shape[1]

    def routes(self, x: torch.Tensor) -> Routes:
        """The routes :meth:`run_chunk` takes on chunk ``x`` as the call's first chunk: its
        probe, forward and classification, no backward (no block is computed).

        A probe that finds the samples coupled ends the classification where
        :meth:`run_chunk` raises :class:`classify.SamplesCoupled`: the routes then hold
        its message and the module calls as far as they were routed.
        """
        self.run_probe(x)
        cap = capture.Capture(self.call, self.router, None, x.shape[0], _discard)
        cap.install()
        try:
            _, y, coupled = self._forward_and_classify(cap, x)
            return self._describe(cap, y, coupled)
        finally:
            cap.active = False
            cap.remove()
            cap.release()

    def _forward_and_classify(
        self, cap: capture.Capture, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, str | None]:
        """The first half of a chunk: the forward of ``x``, each module call recorded by
        ``cap`` on the route :attr:`router` gives it, and the classification of its
        parameters. Returns (the prepared input, the (n, K) output, how the probe found
        the samples coupled (the classification stopped there) or None): the message, not
        the exception, whose traceback would hold this frame's graph."""
        call = self.call
        xp = call.prep(x)
        cap.active = True
        with phase("forward"):
            raw = call.copies.call(call.model, xp)
        cap.active = False
        y = call.head(raw, x.shape[0])
        try:
            self.classifier.classify(cap, y, self.probe, xp)
        except classify.SamplesCoupled as e:
            return xp, y, str(e)
        return xp, y, None

    def _backward(self, cap: capture.Capture, xp: torch.Tensor, y: torch.Tensor) -> int:
        """The second half of a chunk: one backward per pass of its output ``y``; ``cap``
        hands the blocks to its consumer (the whole-model fallback's are the caller's).
        Returns the number of passes."""
        head = self.call.head
        passes = head.passes(y)
        roots = cap.backward_roots(xp)
        if head.full:
            cap.deferred_params |= {p for r in cap.records for p in r.attrs.values()}
        cap.npasses = len(passes)
        if len(passes) > 1 and not head.full:
            grad_bytes = sum(r.out_bytes for r in cap.records if r.rule is not None)
            cap.batch_passes = len(passes) * grad_bytes <= sizes.BATCH_PASSES_BYTES
        for k, w in enumerate(passes):
            cap.pass_idx = k
            if roots and y.requires_grad:
                with phase("backward"):
                    torch.autograd.grad(
                        y,
                        roots,
                        grad_outputs=w,
                        retain_graph=k < len(passes) - 1,
                        allow_unused=True,
                    )
        if cap.batch_passes:
            cap.flush_batched()
        cap.flush_deferred(len(passes), head.full)
        return len(passes)

    def _describe(self, cap: capture.Capture, y: torch.Tensor, coupled: str | None) -> Routes:
        """The :class:`Routes` of the chunk ``cap`` recorded and classified, of output ``y``."""
        params = self.call.copies.params
        reached = graph.param_consumers(y, {q: params[q] for q in self.call.selected})
        saved = sum(
            t.numel() * t.element_size()
            for r in cap.records
            for t in graph.tensors(r.saved if r.rule is None else (r.saved,))
        )
        return Routes(
            K=y.shape[1],
            calls=tuple(
                CallRoute(
                    r.mname,
                    None if r.rule is None else type(r.rule).__name__,
                    tuple(r.attrs.values()),
                )
                for r in cap.records
            ),
            excluded=frozenset(cap.excluded),
            unbatched=frozenset(self.router.unbatched_calls),
            node_rules=MappingProxyType(dict(cap.node_rules)),
            adopted=MappingProxyType({p: a for p, (a, _) in self.classifier.adopted.items()}),
            deferred=frozenset(cap.deferred_params),
            reached=frozenset(reached),
            activation_bytes=saved + sum(r.out_bytes for r in cap.records),
            coupled=coupled,
        )


def _discard(key: tuple, blk: Block) -> None:
    """The consumer of :meth:`Layerwise.routes`' capture (it runs no backward)."""


def _probe_forward(call: Call, x: torch.Tensor) -> torch.Tensor:
    """The (n, K) outputs of a forward of ``x`` alone, each row normalised by itself under
    bn="per_sample" (the probe's forwards)."""
    xp = call.prep(x)
    return call.head(call.copies.call(call.model, xp, samples=_model.ROWS), x.shape[0])
