"""``fastntk.explain``: which path each parameter takes, and the memory a call needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastntk import _model
from fastntk.engine import capture, classify, graph, options, panels, plan, sizes
from fastntk.engine.call import Call
from fastntk.engine.layerwise import Layerwise


@dataclass
class ParamPath:
    name: str  # canonical parameter name
    module: str  # module that owns it ("" = the root)
    module_type: str
    shape: tuple[int, ...]
    path: str  # "rule:<Rule>", "fallback:module", "fallback:model", "coupled", "unused"


@dataclass
class Explanation:
    """Result of :func:`explain`; ``str()`` gives a table."""

    params: list[ParamPath]
    n1: int
    n2: int
    K: int
    bn: str
    coupled: bool
    kernel_bytes: int
    block_bytes: int
    activation_bytes: int
    notes: list[str] = field(default_factory=list)
    # a kernel assembled from panels: the per-sample gradients of one panel of rows, kept
    # while the other chunks stream past (and their concatenation when it is made)
    panel_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """Estimated peak beyond the model itself: activations of one chunk + kernel + one
        block, + the panel's per-sample gradients where the kernel is assembled from panels."""
        return self.activation_bytes + self.kernel_bytes + self.block_bytes + self.panel_bytes

    def __str__(self) -> str:
        w = max([len(p.name) for p in self.params] + [9])
        lines = [f"{'parameter':<{w}}  {'shape':<18} {'module type':<18} path"]
        for p in self.params:
            lines.append(f"{p.name:<{w}}  {str(p.shape):<18} {p.module_type:<18} {p.path}")
        mb = 2**20
        lines += [
            "",
            f"kernel: {self.n1} x {self.n2} (K={self.K}), bn={self.bn!r}"
            + (" [samples coupled: exact batched one-hot backward]" if self.coupled else ""),
            f"memory estimate: kernel {self.kernel_bytes / mb:.1f} MiB + largest gradient block "
            f"{self.block_bytes / mb:.1f} MiB + activations of one chunk "
            f"~{self.activation_bytes / mb:.1f} MiB"
            + (
                f" + per-sample gradients of a panel {self.panel_bytes / mb:.1f} MiB"
                if self.panel_bytes
                else ""
            )
            + f" = ~{self.peak_bytes / mb:.1f} MiB",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


EXPLAIN_SAMPLES = 16  # samples explain's forward and probe run on (at most)


@_model.with_grad
def explain(
    model: nn.Module,
    x: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    output="sum",
    bn: str = "eval",
    params=None,
    chunk_size=None,
    dtype: torch.dtype | None = None,
) -> Explanation:
    """Report, per parameter, which path :func:`fastntk.ntk` takes, and its memory needs.

    Runs the probe of :func:`fastntk.ntk` (a few forward passes on at most
    ``EXPLAIN_SAMPLES`` (16) samples of ``x``, the first chunk's, and on its first and
    last alone; the model is left unchanged) to see which modules are called, how
    often, which dims hold the samples, and whether the samples are coupled (a coupling
    only among later samples of a larger chunk is seen by ntk's probe, not here).

    Args: as :func:`fastntk.ntk`.

    Returns:
        An :class:`Explanation` (print it for a table).
    """
    opts = options.parse(
        model, x, x2, output=output, bn=bn, params=params, method="auto",
        chunk_size=chunk_size, dtype=dtype, progress=None,
    )  # fmt: skip
    x, x2 = _model.plain(x), _model.plain(x2)
    selected, dtype, samples = opts.selected, opts.dtype, opts.samples
    the_plan = plan.make(model, opts, x.shape[0] + (0 if x2 is None else x2.shape[0]), x.device)
    call = Call(model, opts, the_plan)
    job = Layerwise(call)
    head = call.head
    rules = {r.module_name: r.rule for r in the_plan.routes}
    rnn = _model.recurrent(model)
    coupled = the_plan.strategy == "coupled"  # (bn="batch", or a recurrent model)
    owners = _model.owners(model)
    rows: list[ParamPath] = []
    notes: list[str] = []
    with _model.model_state(model, bn):
        # the first chunk's first samples: two missed couplings among later ones (ntk
        # probes its whole first chunk); all of a 256-sample chunk cost many times more
        xs = x[: min(samples, x.shape[0], EXPLAIN_SAMPLES)]
        cap = capture.Capture(call, job.router, None, xs.shape[0], lambda key, blk: None)
        cap.install()
        alone = None  # why ntk runs each sample alone (vmap), if it does
        K = 0  # the model's outputs per sample (0: no forward ran to show them)
        try:
            job.run_probe(xs)
            xp = call.prep(xs)
            cap.active = True
            raw = call.copies.call(model, xp)
            cap.active = False
            y = head(raw)
            K = y.shape[1]
            reached = set(
                graph.param_consumers(y, {q: call.copies.params[q] for q in selected})
            )  # used in y's graph
            try:
                job.classifier.classify(cap, y, job.probe)
            except classify.SamplesCoupled as e:
                coupled = True
                notes.append(str(e))
            called = {r.mname for r in cap.records}
            declined = {r.mname for r in cap.records if r.rule is None}  # fallback calls
            ruled = {r.mname: r.rule for r in cap.records if r.rule is not None}
            kinds: dict[str, list[str]] = {}  # parameter -> the path of each call using it
            for r in cap.records:
                kind = f"rule:{type(r.rule).__name__}" if r.rule is not None else "fallback:module"
                for q in r.attrs.values():
                    kinds.setdefault(q, []).append(kind)
            act = sum(
                t.numel() * t.element_size()
                for r in cap.records
                for t in graph.tensors(r.saved if r.rule is None else (r.saved,))
            ) + sum(r.out_bytes for r in cap.records)
        except _model.MergedSamplesError as e:  # bn="per_sample" on rows that are not samples
            if rnn is not None:  # ntk cannot vmap a recurrent model: it refuses
                raise
            if isinstance(e, _model.OneValuePerChannelError):
                # rows of one value per channel: ntk's forward of one sample alone decides
                # (it raises where the sample alone has one value per channel too)
                cap.active = False
                with torch.no_grad():
                    call.copies.call(model, call.prep(x[:1]), samples=_model.ALONE)
                alone = "bn='per_sample' with rows that are not the samples"
            else:
                alone = str(e).split(":")[0]
        finally:
            cap.remove()
            cap.release()
        if alone is not None:
            coupled = False
            notes.append(
                f"{alone}: ntk's method='auto' runs each sample alone through the "
                "model (torch.func vmap(jacrev), exact; holds a chunk's Jacobian)"
            )
            for pname, p in selected.items():
                mname, mod, _ = owners[pname][0]
                rows.append(ParamPath(pname, mname, type(mod).__name__, tuple(p.shape), "vmap"))
            act = 0
        else:
            for pname, p in selected.items():
                mname, mod, _ = owners[pname][0]
                if coupled:
                    path = "coupled"
                elif pname in cap.broadcast:
                    path = "rule:BroadcastRule (added or expanded over the batch outside modules)"
                elif pname in cap.excluded and mname in job.router.unbatched_calls:
                    path = "fallback:model (its module's call has no sample dim: no batched input)"
                elif pname in cap.excluded:
                    path = "fallback:model (used outside its module's call)"
                elif pname in job.classifier.adopted:
                    anc = job.classifier.adopted[pname][0]
                    kind = (
                        f"rule:{type(ruled[anc]).__name__}"
                        if anc not in declined
                        else "fallback:module"
                    )
                    path = f"{kind} (used inside {repr(anc) if anc else 'the model'}'s call)"
                elif not any(mn in called for mn in the_plan.module_of[pname]) or (
                    pname not in reached and pname not in cap.broadcast
                ):  # (a call under torch.no_grad(): its output does not reach the kernel)
                    path = "unused (no gradient reaches it)"
                else:
                    rule = rules[mname]
                    path = f"rule:{type(rule).__name__}" if rule is not None else "fallback:module"
                    if rule is not None and mname in declined:
                        path = f"fallback:module ({type(rule).__name__} declined the call)"
                    if pname in cap.deferred_params:
                        both = sorted(set(kinds.get(pname, ())))
                        if len(both) > 1:  # tied across module types: each call's own path
                            path = " + ".join(both)
                        path += " (used several times: exact sum of uses)"
                rows.append(ParamPath(pname, mname, type(mod).__name__, tuple(p.shape), path))
        # activation memory of one chunk, scaled from the probe's saved tensors
        act = act * 2 // max(1, xs.shape[0])  # per sample, inputs and output gradients
    n1 = x.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    chunk = min(samples, n1 + (0 if x2 is None else n2))
    R = head.rows(K)
    kernel = R * R * n1 * n2 * dtype.itemsize
    biggest = max(p.numel() for p in selected.values())
    block = min(sizes.BLOCK_BYTES, chunk * R * biggest * dtype.itemsize)
    panel = 0
    if (n1 if x2 is None else n1 + n2) > samples:  # ntk's _panels
        if not K and not head.one_pass:  # (the panels' sizing forward shows it)
            K = panels.outputs(call, x)
        panel_rows, per_sample = panels.rows(call, x, K)
        panel = 2 * min(n1, panel_rows) * per_sample  # kept, and concatenated once per panel
    if n1 > samples:
        notes.append(
            f"{n1} samples exceed the chunk of {samples}: the kernel is assembled from panels "
            "(each chunk's forward/backward runs more than once)"
        )
    if rnn is not None:
        notes.append(
            f"{rnn} is recurrent: the kernel is taken through the batch graph "
            "(one backward per sample and pass; no per-layer rule, no vmap)"
        )
    elif _model.is_coupled(model, bn):
        notes.append("bn='batch' (or BatchNorm without running stats) couples the samples")
    return Explanation(
        rows,
        n1,
        n2,
        K,
        bn,
        coupled,
        kernel,
        block,
        act * chunk,
        notes,
        panel_bytes=0 if coupled or alone is not None else panel,
    )
