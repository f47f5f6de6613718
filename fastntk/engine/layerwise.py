"""The layerwise strategy: per-sample gradient blocks layer by layer, one chunk of samples
at a time (a forward, one backward per pass; :mod:`.capture` hands each layer's blocks to
the consumer during the backward), contracted into the kernel by :mod:`.gram` (one chunk)
or :mod:`.panels` (several)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastntk import _model
from fastntk.engine import capture, classify, fallback, gram, graph, panels, probe, sizes
from fastntk.engine.call import Call
from fastntk.profiling import phase
from fastntk.rules import Block, GramRule


class Layerwise:
    """The layerwise strategy of one call: the probe of its first chunk and the decisions
    that chunk makes for all (the sample dims of each module call, the routes of
    parameters outside module calls)."""

    def __init__(self, call: Call):
        self.call = call
        self.probe: probe.Probe | None = None  # measured sample dims (run_probe)
        self._probed = False
        self._call_dims: dict[tuple[str, int], probe.CallDims | None] = {}
        self.unbatched_calls: set[str] = set()  # modules with a call the probe sent whole
        self.classifier = classify.Classifier(call)

    def kernel(self, x1: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
        """Θ(x1, x2): one chunk of every sample where it fits, else panels."""
        call = self.call
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        if x2 is None and n1 <= call.samples:
            acc = gram.GramAccumulator(call, n1, n1, None)
            self.run_chunk(x1, acc.add, acc.streams)
            return call.head.finish(acc.result(), n1, n1)
        if x2 is not None and n1 + n2 <= call.samples:
            acc = gram.GramAccumulator(call, n1, n2, n1)
            self.run_chunk(torch.cat([x1, x2]), acc.add, acc.streams)
            return call.head.finish(acc.result(), n1, n2)
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

    def _probe_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The (n, K) outputs of a forward of ``x`` alone, each row normalised by itself
        under bn="per_sample" (the probe's forwards)."""
        call = self.call
        xp = call.prep(x)
        return call.head(call.copies.call(call.model, xp, samples=_model.ROWS), x.shape[0])

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

    def row_ranges(
        self, pname: str, rule: GramRule | None, per_sample: int
    ) -> list[tuple[int, int]]:
        """Parameter-row ranges of ``pname``'s blocks (``per_sample`` rows per sample each).

        Sized for the call's largest chunk (``chunk_n``), never the current one: every
        chunk of a call must cut a parameter into the same ranges, since the blocks of two
        chunks meet by key in the panel assembly (a smaller last chunk cut differently
        gave blocks of mismatched widths).
        """
        p = self.call.copies.params[pname]
        rows = p.shape[0] if p.dim() else 1
        if rule is None or not rule.supports_rows or p.dim() == 0:
            return [(0, rows)]
        the_plan = self.call.plan
        nrows = the_plan.chunk_n * per_sample
        per_row = max(1, p.numel() // rows)
        budget = (
            sizes.BLOCK_BYTES if the_plan.cols is None else the_plan.cols * nrows * p.element_size()
        )
        max_rows = max(1, budget // max(1, nrows * per_row * p.element_size()))
        return [(r, min(rows, r + max_rows)) for r in range(0, rows, max_rows)]

    def module_grads(
        self, rec: capture.Record, gouts: list[torch.Tensor | None]
    ) -> dict[str, torch.Tensor]:
        """The per-module fallback's per-sample gradients of ``rec``'s call
        (:func:`fallback.module_grads`)."""
        return fallback.module_grads(self.call, rec, gouts)

    def run_chunk(
        self,
        x: torch.Tensor,
        consume: Callable[[tuple, Block], None],
        streams: Callable[[int], bool] = capture.never,
    ) -> int:
        """Forward + one backward per pass on chunk ``x``; feeds blocks to ``consume``.

        ``streams(nbytes)``: whether ``consume`` has finished with a block of that size
        when it returns (never keeps it), so that the block may live in reused memory.
        Returns the number of passes (rows per sample of the blocks: R).
        """
        call, head = self.call, self.call.head
        self.run_probe(x)
        cap = capture.Capture(self)
        cap.n = x.shape[0]
        cap.consume = consume
        cap.streams = streams
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
        return len(passes)
