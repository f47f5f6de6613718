"""The layerwise strategy: per-sample gradient blocks layer by layer, one chunk of samples
at a time (a forward, one backward per pass; :mod:`.capture` hands each layer's blocks to
the consumer during the backward), contracted into the kernel by :mod:`.gram` (one chunk)
or :mod:`.panels` (several)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastntk import _model
from fastntk.engine import capture, classify, fallback, gram, panels, probe, sizes
from fastntk.engine.call import Call
from fastntk.profiling import phase
from fastntk.rules import Block


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
                    self._probe_forward,
                    [(r.module_name, r.module) for r in call.plan.routes],
                    x,
                    {q: call.copies.params[q] for q in call.selected},
                )
            self.router.probe = self.probe

    def _probe_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The (n, K) outputs of a forward of ``x`` alone, each row normalised by itself
        under bn="per_sample" (the probe's forwards)."""
        call = self.call
        xp = call.prep(x)
        return call.head(call.copies.call(call.model, xp, samples=_model.ROWS), x.shape[0])

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
        call, head = self.call, self.call.head
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
            xp = call.prep(x)
            cap.active = True
            with phase("forward"):
                raw = call.copies.call(call.model, xp)
            cap.active = False
            y = head(raw, x.shape[0])
            passes = head.passes(y)
            self.classifier.classify(cap, y, self.probe)
            roots = ([xp] if xp.requires_grad else []) + cap.roots
            roots += [call.copies.params[p] for p in cap.excluded]
            roots = list({id(t): t for t in roots}.values())
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
        finally:
            cap.active = False
            cap.remove()
            cap.release()
        if cap.excluded:
            fallback.model_blocks(call, x, consume, sorted(cap.excluded), len(passes))
        return y.shape[1]
