"""The plan of one call: what ``ntk`` will run, decided before any forward.

A :class:`Plan` is a plain, immutable description: the strategy (``"layerwise"``,
``"jacobian"`` (torch.func ``vmap(jacrev)``), ``"coupled"`` (one-hot backward passes
through the batch graph)), the kernels the rules use, a route per planned module (its
rule, or the per-module fallback), the chunk sizes and the row ranges of the per-sample
gradient blocks, and the plans that take over when a forward shows a fact no
inspection of the model could (``on``): the samples coupled
inside the model (the probe: ``x - x.mean(0)``), a forward that changes a tensor
torch.func does not own (a buffer updated in ``forward``), a forward torch.func cannot
transform (``.item()``, control flow on values, an op without a batching rule), a BatchNorm whose rows are not
the samples under ``bn="per_sample"``. Each such re-plan is a decision written here, once,
not an exception handler of the caller's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastntk import _model
from fastntk.engine import sizes
from fastntk.engine.options import LAYERWISE_METHODS, Options
from fastntk.errors import UnsupportedError
from fastntk.rules import GramRule, find_rule

# Facts a forward can show (the keys of Plan.on)
SAMPLES_COUPLED = "samples coupled"  # the probe: a sample's output changes with the batch
CAPTURED_MUTATION = "captured mutation"  # torch.func met a forward changing a buffer in place
UNTRACEABLE = "untraceable"  # torch.func cannot transform a forward (.item(), control flow)
MERGED_SAMPLES = "merged samples"  # bn="per_sample": a BatchNorm's rows are not the samples


@dataclass(frozen=True)
class Route:
    """One planned module: the rule its calls take (None: the per-module torch.func
    fallback) for its selected parameters ``attrs`` (attribute -> canonical name). A
    module with a fallback parameter runs entirely through the fallback."""

    module_name: str
    module: nn.Module
    attrs: Mapping[str, str]
    rule: GramRule | None


@dataclass(frozen=True)
class Plan:
    """What one ``ntk`` call runs (module docstring)."""

    strategy: str  # "layerwise" | "jacobian" | "coupled"
    why: str  # why this strategy, in words (explain prints it)
    backend: str  # the kernels of the rules and Grams: "torch", "auto", "triton", "csrc"
    routes: tuple[Route, ...]
    # canonical parameter name -> every (module name, module, attribute) registering it
    owners: Mapping[str, list[tuple[str, nn.Module, str]]]
    samples: int  # samples per forward/backward chunk
    cols: int | None  # columns bound of one per-sample gradient block
    chunk_n: int  # samples of the largest chunk (every chunk cuts a parameter alike)
    batched: bool = False  # coupled: one-hot backward passes batched (is_grads_batched)
    use_vmap: bool = False  # coupled: method="vmap" asked for the batched passes
    fresh: bool = False  # run with fresh copies (the forward that failed changed them)
    on: Mapping[str, Plan] = field(default_factory=dict)  # fact -> the plan taking over

    def after(self, fact: str) -> Plan | None:
        """The plan that takes over once a forward showed ``fact``; None: the call fails
        with the error that showed it."""
        return self.on.get(fact)

    def row_ranges(
        self, p: torch.Tensor, rule: GramRule | None, per_sample: int, cap: int | None = None
    ) -> list[tuple[int, int]]:
        """Row ranges of parameter ``p``'s per-sample gradient blocks (``per_sample`` rows
        per sample each), each within the block budget (``cols`` columns, else
        ``sizes.BLOCK_BYTES``, and the rule's ``cap`` in bytes: :meth:`GramRule.block_cap`).

        Sized for the call's largest chunk (``chunk_n``), never the current one: every
        chunk of a call must cut a parameter into the same ranges, since the blocks of two
        chunks meet by key in the panel assembly (a smaller last chunk cut differently
        gave blocks of mismatched widths).
        """
        rows = p.shape[0] if p.dim() else 1
        if rule is None or not rule.supports_rows or p.dim() == 0:
            return [(0, rows)]
        nrows = self.chunk_n * per_sample
        per_row = max(1, p.numel() // rows)
        budget = sizes.BLOCK_BYTES if self.cols is None else self.cols * nrows * p.element_size()
        budget = budget if cap is None else min(budget, cap)
        max_rows = max(1, budget // max(1, nrows * per_row * p.element_size()))
        return [(r, min(rows, r + max_rows)) for r in range(0, rows, max_rows)]

    @property
    def module_of(self) -> dict[str, list[str]]:
        """Canonical parameter name -> the planned modules that hold it."""
        out: dict[str, list[str]] = defaultdict(list)
        for r in self.routes:
            for pname in r.attrs.values():
                out[pname].append(r.module_name)
        return out


def routes(selected: Mapping[str, nn.Parameter], owners: Mapping) -> tuple[Route, ...]:
    """A route for each module registering a selected parameter: its rule where the rule
    takes every such parameter of it, else the per-module fallback."""
    rules: dict[str, GramRule | None] = {}
    attrs: dict[str, dict[str, str]] = defaultdict(dict)
    mods: dict[str, nn.Module] = {}
    for pname in selected:
        for mname, m, attr in owners[pname]:
            rule = find_rule(m)
            if rule is not None and attr not in rule.param_names:
                rule = None
            if mname in rules and rules[mname] is not rule:
                rule = None  # one module: rule for some params, fallback for others
            rules[mname] = rule
            attrs[mname][attr] = pname
            mods[mname] = m
    return tuple(Route(mn, mods[mn], attrs[mn], rules[mn]) for mn in rules)


def make(
    model: nn.Module,
    opts: Options,
    n: int,
    device: torch.device,
    *,
    sketch: bool = False,
) -> Plan:
    """The plan of a call with options ``opts`` on ``n`` samples in all (x1 and x2) on
    ``device``; ``sketch``: the sketch's (it streams the layerwise blocks; no re-plans)."""
    method, bn = opts.method, opts.bn
    owners = _model.owners(model)
    base = dict(
        backend="torch" if sketch else backend(method, device),
        routes=routes(opts.selected, owners),
        owners=owners,
        samples=opts.samples,
        cols=opts.cols,
        chunk_n=min(opts.samples, n),
    )
    if sketch:
        return Plan("layerwise", "the sketch streams the layerwise blocks", **base)
    rnn = _model.recurrent(model)
    coupled = _model.is_coupled(model, bn)
    if rnn is not None and method == "vmap":
        raise UnsupportedError(
            f"method='vmap' cannot differentiate {rnn}: torch.func has no batching rule for "
            "its fused kernel; use method='auto' (exact, through the batch graph)"
        )
    # One-hot backward passes batched with is_grads_batched (vmap over the backward) for
    # method="vmap", and on a GPU; on the CPU a plain loop of backward passes is faster:
    # NB201 (C=16), N=64, bn="batch", 2-core CPU: 30.5 s batched vs 10.4 s (python
    # bench/bench_engine_choices.py coupled, README "Known limits").
    batched = method == "vmap" or (method != "loop" and device.type != "cpu")
    # bn="per_sample" with a BatchNorm whose rows are not the samples (frames merged into
    # the batch dim, a BatchNorm on part of the batch): only a forward of each sample alone
    # is exact. "loop" is the reference: it takes that path too; the layerwise methods
    # were asked for the layerwise engine.
    on_merged = {}
    if method in ("auto", "loop") and rnn is None:
        why = "bn='per_sample' on BatchNorm rows that are not the samples: each sample alone"
        on_merged = {MERGED_SAMPLES: Plan("jacobian", why, **base)}
    # a per-module (or whole-model) torch.func fallback met a forward that updates a buffer
    # in place, or one it cannot transform at all (data-dependent control flow, .item(), an
    # op without a batching rule): the batch graph is exact without torch.func
    on_torch_func = {}
    if method in LAYERWISE_METHODS and not coupled:
        why = "a forward changes a buffer in place (no torch.func): the batch graph"
        on_torch_func = {CAPTURED_MUTATION: Plan("coupled", why, fresh=True, **base)}
        why = "torch.func cannot trace the model (.item(), control flow): the batch graph"
        on_torch_func[UNTRACEABLE] = Plan("coupled", why, fresh=True, **base)
    if rnn is not None and method in LAYERWISE_METHODS:
        # no per-layer rule, no vmap (not even over the backward: is_grads_batched): one
        # backward per sample and pass (exact)
        why = f"{rnn} is recurrent: one backward per sample and pass through the batch graph"
        return Plan("coupled", why, on=on_torch_func, **base)
    if coupled:
        why = "bn='batch' (or BatchNorm without running statistics) couples the samples"
        return Plan("coupled", why, batched=batched, use_vmap=method == "vmap",
                    on={**on_merged, **on_torch_func}, **base)  # fmt: skip
    if method in LAYERWISE_METHODS:
        why = "the probe found the samples coupled inside the model: the batch graph"
        after_probe = Plan("coupled", why, batched=batched, on={**on_merged, **on_torch_func},
                           **base)  # fmt: skip
        return Plan("layerwise", "per-sample gradients layer by layer", **base,
                    on={SAMPLES_COUPLED: after_probe, **on_merged, **on_torch_func})  # fmt: skip
    if method == "vmap":
        return Plan("jacobian", "method='vmap': torch.func vmap(jacrev)", **base,
                    on={**on_merged, **on_torch_func})  # fmt: skip
    return Plan("coupled", "method='loop': one backward per sample and pass", **base,
                on={**on_merged, **on_torch_func})  # fmt: skip


def backend(method: str, device: torch.device) -> str:
    """Which kernels the layerwise rules use.

    ``"layerwise"``: PyTorch ops only (``"torch"``). ``"auto"``: PyTorch ops, plus the C++
    extension's ops on the CPU where they measured faster: the Gram of dense blocks (see
    ``rules.CSRC_GRAM_MIN_COLS``) and BatchNorm's one-pass weight/bias blocks
    (``rules.norm``); the Triton kernels are unmeasured on a GPU, so auto does not pick
    them. ``"triton"``: fastntk's Triton kernels (a GPU, or ``TRITON_INTERPRET=1``).
    ``"csrc"``: the C++ extension's ops wherever they apply (the per-sample conv gradient,
    every dense Gram; on a GPU the CUDA build's kernels), unmeasured or measured slower
    than ``"auto"``'s choice, so never chosen by it.
    """
    if method == "triton":
        try:
            from fastntk.kernels import why_not
        except ImportError as e:  # pragma: no cover - the package ships fastntk.kernels
            raise UnsupportedError(f"method='triton' needs fastntk.kernels: {e}") from e
        reason = why_not(device)
        if reason is not None:
            raise UnsupportedError(f"method='triton' cannot run here: {reason}")
        return "triton"
    if method == "csrc":
        from fastntk import _ext

        if not _ext.available():
            raise UnsupportedError(f"method='csrc' needs fastntk's C++ extension: {_ext.why_not()}")
        return "csrc"
    return "auto" if method == "auto" else "torch"
