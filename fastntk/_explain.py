"""``fastntk.explain``: the plan ``ntk`` runs, the path each parameter takes, and the memory
the call needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastntk import _model
from fastntk.engine import options, panels, plan, sizes
from fastntk.engine.call import Call
from fastntk.engine.layerwise import Layerwise, Routes
from fastntk.errors import CapturedMutationError, FastNTKError, UntraceableError


@dataclass
class ParamPath:
    name: str  # canonical parameter name
    module: str  # module that owns it ("" = the root)
    module_type: str
    shape: tuple[int, ...]
    path: str  # "rule:<Rule>", "fallback:module", "fallback:model", "coupled", "unused"


@dataclass
class Explanation:
    """Result of :func:`explain`; ``str()`` gives a table of the paths, then the plan."""

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
    strategy: str = ""  # the plan ntk runs (engine.plan.Plan): "layerwise", "jacobian", ...
    why: str = ""  # why that strategy
    backend: str = ""  # the kernels of its rules and Grams
    chunk: int = 0  # samples per forward/backward chunk
    panel_rows: int = 0  # rows of a panel (0: one chunk holds every sample)

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
            f"plan: {self.strategy} ({self.why}); backend {self.backend!r}; chunks of "
            f"{self.chunk} samples"
            + (f", panels of {self.panel_rows} rows" if self.panel_rows else ""),
            f"kernel: {self.n1} x {self.n2} (K={self.K}), bn={self.bn!r}"
            + (" [samples coupled: exact one-hot backward passes]" if self.coupled else ""),
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
    """Report the plan :func:`fastntk.ntk` runs, which path each parameter takes, and the
    memory the call needs.

    Makes ntk's plan (:mod:`fastntk.engine.plan`) and runs the first half of its first
    chunk (:meth:`~fastntk.engine.layerwise.Layerwise.routes`: the probe, a forward and the
    classification, on at most ``EXPLAIN_SAMPLES`` (16) samples of ``x``, the first
    chunk's; the model is left unchanged) to see which modules are called, how often,
    which dims hold the samples, and whether the samples are coupled (a coupling only
    among later samples of a larger chunk is seen by ntk's probe, not here). Where that
    shows a fact the plan names (:attr:`~fastntk.engine.plan.Plan.on`), the plan taking
    over is reported, as ntk runs it.

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
    n1 = x.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    the_plan = plan.make(model, opts, n1 + (0 if x2 is None else n2), x.device)
    call = Call(model, opts, the_plan)
    head = call.head
    notes: list[str] = []
    routes: Routes | None = None  # (None: no forward showed them)
    # the first chunk's first samples: two missed couplings among later ones (ntk
    # probes its whole first chunk); all of a 256-sample chunk cost many times more
    xs = x[: min(samples, n1, EXPLAIN_SAMPLES)]
    with _model.model_state(model, bn):
        try:
            routes = Layerwise(call).routes(xs)
        except _model.MergedSamplesError as e:  # bn="per_sample" on rows that are not samples
            nxt = the_plan.after(plan.MERGED_SAMPLES)
            if nxt is None:  # (a recurrent model: ntk cannot run a sample alone)
                raise
            if isinstance(e, _model.OneValuePerChannelError):
                # rows of one value per channel: the forward of one sample alone the plan
                # taking over starts with decides (it raises where that sample alone has
                # one value per channel too)
                with torch.no_grad():
                    call.copies.call(model, call.prep(x[:1]), samples=_model.ALONE)
                alone = "bn='per_sample' with rows that are not the samples"
            else:
                alone = str(e).split(":")[0]
            notes.append(
                f"{alone}: ntk's method='auto' runs each sample alone through the "
                "model (torch.func vmap(jacrev), exact; holds a chunk's Jacobian)"
            )
            the_plan = nxt
        if routes is not None and routes.coupled is not None:
            notes.append(routes.coupled)
            the_plan = the_plan.after(plan.SAMPLES_COUPLED) or the_plan
        elif routes is not None and the_plan.strategy == "layerwise":
            paths = _layerwise_paths(the_plan, routes, selected)
            if any(v.startswith("fallback") for v in paths.values()):
                found = _torch_func_fails(model, opts, the_plan, xs)
                nxt = None if found is None else the_plan.after(found[0])
                if nxt is not None:
                    notes.append(f"{found[1]}: ntk's method='auto' takes the batch graph "
                                 "(exact, one backward per sample and pass)")  # fmt: skip
                    the_plan = nxt
        K = 0 if routes is None else routes.K  # (0: no forward ran to show it)
        R = head.rows(K)
        panel = panel_rows = 0
        if (n1 if x2 is None else n1 + n2) > samples:  # ntk's panels
            if not K and not head.one_pass:  # (the panels' sizing forward shows it)
                K = panels.outputs(call, x)
            panel_rows, per_sample = panels.rows(call, x, K)
            panel = 2 * min(n1, panel_rows) * per_sample  # kept, and concatenated once per panel
    strategy = the_plan.strategy
    if strategy == "layerwise":
        assert routes is not None
        paths = _layerwise_paths(the_plan, routes, selected)
    else:
        paths = dict.fromkeys(selected, "vmap" if strategy == "jacobian" else "coupled")
    rows = []
    for pname, p in selected.items():
        mname, mod, _ = the_plan.owners[pname][0]
        rows.append(ParamPath(pname, mname, type(mod).__name__, tuple(p.shape), paths[pname]))
    # activation memory of one chunk, scaled from the forward's saved tensors: per sample,
    # inputs and output gradients
    act = 0
    if routes is not None and strategy != "jacobian":
        act = routes.activation_bytes * 2 // max(1, xs.shape[0])
    chunk = the_plan.chunk_n
    biggest = max(p.numel() for p in selected.values())
    block = min(sizes.BLOCK_BYTES, chunk * R * biggest * dtype.itemsize)
    if n1 > samples:
        notes.append(
            f"{n1} samples exceed the chunk of {samples}: the kernel is assembled from panels "
            "(each chunk's forward/backward runs more than once)"
        )
    layerwise = strategy == "layerwise"
    return Explanation(
        rows,
        n1,
        n2,
        K,
        bn,
        strategy == "coupled",
        R * R * n1 * n2 * dtype.itemsize,
        block,
        act * chunk,
        notes,
        panel_bytes=panel if layerwise else 0,
        strategy=strategy,
        why=the_plan.why,
        backend=the_plan.backend,
        chunk=chunk,
        panel_rows=min(n1, panel_rows) if layerwise else 0,
    )


def _torch_func_fails(model, opts, the_plan: plan.Plan, x: torch.Tensor) -> tuple[str, str] | None:
    """(the fact, the message) where the plan's torch.func fallbacks cannot compute the
    model (:class:`UntraceableError`: ``.item()``, control flow on values;
    :class:`CapturedMutationError`: a buffer updated in place), found by running the plan
    on ``x``'s first two samples; None where they run."""
    try:
        Layerwise(Call(model, opts, the_plan)).kernel(x[:2], None)
    except UntraceableError as e:  # (the messages' first part: the reason; the rest names
        return plan.UNTRACEABLE, str(e).split("; fastntk.ntk")[0]  # the methods)
    except CapturedMutationError as e:
        return plan.CAPTURED_MUTATION, str(e).split("; fastntk.ntk")[0]
    except FastNTKError:  # (anything else: ntk itself says it)
        return None
    return None


def _layerwise_paths(the_plan: plan.Plan, routes: Routes, selected) -> dict[str, str]:
    """Canonical parameter name -> its path under the layerwise strategy, in words."""
    called = {c.module_name for c in routes.calls}
    declined = {c.module_name for c in routes.calls if c.rule is None}  # fallback calls
    ruled = {c.module_name: c.rule for c in routes.calls if c.rule is not None}
    kinds: dict[str, list[str]] = {}  # parameter -> the path of each call using it
    for c in routes.calls:
        for q in c.params:
            kinds.setdefault(q, []).append(f"rule:{c.rule}" if c.rule else "fallback:module")
    planned = {r.module_name: r.rule for r in the_plan.routes}
    module_of = the_plan.module_of
    out = {}
    for pname in selected:
        mname = the_plan.owners[pname][0][0]
        if pname in routes.node_rules:
            path = f"rule:{routes.node_rules[pname]} (on the one autograd node using it)"
        elif pname in routes.excluded and mname in routes.unbatched:
            path = "fallback:model (its module's call has no sample dim: no batched input)"
        elif pname in routes.excluded:
            path = "fallback:model (used outside its module's call)"
        elif pname in routes.adopted:
            anc = routes.adopted[pname]
            kind = f"rule:{ruled[anc]}" if anc not in declined else "fallback:module"
            path = f"{kind} (used inside {repr(anc) if anc else 'the model'}'s call)"
        elif not any(mn in called for mn in module_of[pname]) or pname not in routes.reached:
            # (a call under torch.no_grad(): its output does not reach the kernel)
            path = "unused (no gradient reaches it)"
        else:
            rule = planned[mname]
            path = f"rule:{type(rule).__name__}" if rule is not None else "fallback:module"
            if rule is not None and mname in declined:
                path = f"fallback:module ({type(rule).__name__} declined the call)"
            if pname in routes.deferred:
                both = sorted(set(kinds.get(pname, ())))
                if len(both) > 1:  # tied across module types: each call's own path
                    path = " + ".join(both)
                path += " (used several times: exact sum of uses)"
        out[pname] = path
    return out
