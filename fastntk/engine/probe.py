"""Which dimension of each module call's tensors holds the samples: measured, not assumed.

The layerwise engine hooks module calls and reads per-sample quantities off their inputs
and outputs. It used to assume the samples sit in dim 0 (dim 1 for ``batch_first=False``
modules) and that a tensor is batched when that dim has the batch's size. Both fail
silently on legitimate models: a ``Linear`` applied to a sequence-first (T, N, E) tensor
inside a batch-first model, a module called on a learned query with no batch dimension
(DETR/Perceiver), a weight parametrization (its call returns the weight), a shared (T, E)
table passed to a layer when T happens to equal N.

Before a job's first chunk, the probe runs the model once more on that chunk's last
``q`` samples (``q = 1``, or 2 where the model cannot run on one; when the chunk has no
more than ``q``, the chunk and perturbed copies of its first sample, ``q + 1`` in all),
recording the shapes of every planned module call's flattened inputs and outputs (and,
for models with parameters used outside module calls, a second time with the autograd
graph: the shapes of the nodes that use each parameter). In the chunk's own forward (``n`` samples), a
tensor's sample dim is the one dim of size ``n`` there and ``q`` in the probe; a tensor
whose shape is the same in both is not batched; one with a dim that scales with the
batch in a merged form (N·T rows) is ambiguous; one whose shapes differ without any dim
that scales (sizes that depend on the data: a batch trimmed to its longest sequence)
leaves its call unmeasured (the assumed layout). The shapes of a tensor without samples
do not change with the batch, so no coincidence of fixed sizes (T = N) can pass for a
sample dim; sizes that depend on the data can still coincide (rows selected by a mask,
as many as the samples). The model's output for the probe's samples must also be what
the chunk's forward gives them (within ``tolerance``):
otherwise the samples are coupled inside the model (``x - x.mean(0)``) and the kernel is
taken through the batch graph.

A call whose tensors are not laid out as its rule assumes takes the per-module torch.func
fallback with the measured dims; a call whose outputs have no sample dim gives its
parameters to the whole-model fallback; a parameter that no module rule serves takes
a node rule (``rules.nodes``) only where the node using it has the samples in dim 0, or
rows in sample-major blocks (compared with the probe's rows for its samples). Where the
probe's calls do not line up with the chunk's (a forward that raises on the small batch,
data-dependent control flow), the probe is dropped and the assumed layout serves, as
before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from fastntk.engine import graph

# x -> the model's (n, K) outputs for a batch x of n samples (each row its own under
# bn="per_sample"): the forward the probe runs
Forward = Callable[[torch.Tensor], torch.Tensor]

AMBIGUOUS = -1  # the samples are not in one dim (merged with another, or mixed)
UNKNOWN = -2  # the shapes differ, but nothing scales with the batch (data-dependent sizes)

Shape = tuple[int, ...] | None  # None: not a tensor


@dataclass
class CallDims:
    """Sample dims of one module call: per flattened ``(args, kwargs)`` entry and per
    output tensor (``_tensors(out)`` order); None: not batched (or not a tensor)."""

    ins: list[int | None]
    outs: list[int | None]


@dataclass
class Probe:
    q: int  # samples of the probe's forward
    calls: list[tuple[str, list[Shape], list[Shape]]]  # (module, input shapes, output shapes)
    y: torch.Tensor  # the model's (q, K) outputs
    xs: torch.Tensor  # the probe's samples: the chunk's last q (or the chunk, padded)
    n0: int  # samples of the chunk it was made for
    forward: Forward  # the forward it ran (run again, with the graph, by batch_first_use)
    params: dict[str, torch.Tensor]  # the selected parameters (the forward's, by name)
    # the model's outputs for the chunk's FIRST sample alone (a reversed cumsum, or a
    # reference taken from the last sample, leaves the last sample's output unchanged),
    # or with q = 2 for the first and the last together (samples grouped in pairs: the
    # last two are one group, but the first and the last are not); None where the chunk
    # has too few samples for either
    y_first: torch.Tensor | None = None
    # (output, parameter uses, consumers) of the forward with the graph: node_use
    _graph: tuple[torch.Tensor, dict, graph.Consumers] | None = None
    _y_graph: torch.Tensor | None = None  # run() kept its forward's graph (keep_graph)
    _index: dict[tuple[str, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        count: dict[str, int] = {}
        for i, (mname, _, _) in enumerate(self.calls):
            k = count.get(mname, 0)
            count[mname] = k + 1
            self._index[(mname, k)] = i

    def dims(self, mname: str, k: int, ins: list[Shape], outs: list[Shape],
             n: int) -> CallDims | None:  # fmt: skip
        """The sample dims of ``mname``'s ``k``-th call in a chunk of ``n`` samples, from
        its shapes there; None where the probe saw no such call or another structure."""
        i = self._index.get((mname, k))
        if i is None or n == self.q:
            return None
        _, pins, pouts = self.calls[i]
        if len(pins) != len(ins) or len(pouts) != len(outs):
            return None
        dims = CallDims(
            [sample_dim(a, b, n, self.q) for a, b in zip(ins, pins, strict=True)],
            [sample_dim(a, b, n, self.q) for a, b in zip(outs, pouts, strict=True)],
        )
        if UNKNOWN in dims.ins or UNKNOWN in dims.outs:
            return None  # not measurable: the assumed layout serves, as without a probe
        return dims

    def node_use(self, pname: str, resolve: Callable[[list, graph.Consumers], Any]) -> Any:
        """``resolve(uses, consumers)`` on the probe's own autograd graph, with ``uses`` the
        (node, input index) pairs using ``pname`` there: where a node rule would serve
        ``pname`` in the probe's forward (``engine.classify``: does that node have the
        samples in dim 0, or sample-major rows?). The forward with the graph is made when
        first asked (only models with parameters that no module rule serves need it) and
        kept until :meth:`drop_graph`."""
        if self._graph is None:
            y, self._y_graph = self._y_graph, None
            if y is None:
                with torch.enable_grad():
                    y = self.forward(self.xs)
            self._graph = (y, graph.param_consumers(y, self.params), graph.Consumers(y))
        _, uses, consumers = self._graph
        return resolve(uses.get(pname, []), consumers)

    def drop_graph(self) -> None:
        self._graph = self._y_graph = None

    def coupled(self, y: torch.Tensor) -> str | None:
        """Why the samples are coupled, judged by the chunk's outputs ``y`` (n, K) for
        the probe's samples, or None."""
        if y.shape[0] != self.n0:
            return None
        if self.n0 > self.q:  # the probe had the chunk's last q samples
            ya, yb = y.detach()[self.n0 - self.q :], self.y
        else:  # the whole chunk, then padding
            ya, yb = y.detach(), self.y[: self.n0]
        pairs = [("last", ya, yb)]
        if self.y_first is not None:
            rows = [0] if self.q == 1 else [0, self.n0 - 1]
            pairs.append(("first", y.detach()[rows], self.y_first))
        for which, ya, yb in pairs:
            yb = yb.detach()  # (a model that returns a parameter: it requires grad under no_grad)
            if ya.shape != yb.shape:
                return None
            if not (bool(torch.isfinite(ya).all()) and bool(torch.isfinite(yb).all())):
                if bool(torch.isfinite(ya).all()):  # finite in the batch, not alone (the
                    return (  # std of one sample): the output depends on the batch
                        f"the model's output for the batch's {which} sample(s) alone is not "
                        "finite, in the batch it is: the samples are coupled inside the model"
                    )
                return None  # not finite in the batch either: the kernel will say so
            scale = float(torch.maximum(ya.abs().max(), yb.abs().max())) if ya.numel() else 0.0
            err = float((ya - yb).abs().max()) if ya.numel() else 0.0
            if err > tolerance(y) * max(scale, 1e-30):
                return (
                    f"the model's output for the batch's {which} sample(s) changes with the "
                    f"rest of the batch (by {err / max(scale, 1e-30):.1e} of its size): the "
                    "samples are coupled inside the model"
                )
        return None


def tolerance(y: torch.Tensor) -> float:
    """Relative change of an output between batch sizes that is still numerical noise
    (different kernels per batch size; TF32 convolutions on a GPU)."""
    if y.dtype == torch.float64:
        return 1e-8
    if y.dtype == torch.float32:
        return 1e-2 if y.is_cuda else 1e-4
    return 5e-2


def sample_dim(real: Shape, small: Shape, n: int, q: int) -> int | None:
    """The sample dim of a tensor of shape ``real`` with ``n`` samples and ``small`` with
    ``q`` (module docstring); None: not batched or not a tensor.

    AMBIGUOUS: several dims scale with the batch, or one does in a merged form (N·T rows:
    ``real[d] / small[d] == n / q`` with ``real[d] != n``). UNKNOWN: the shapes differ but
    no dim scales with the batch (a size that depends on the data, e.g. a batch trimmed
    to its longest sequence, without a sample dim the probe could confirm).
    """
    if real is None:
        return None
    if small is None or len(real) != len(small):
        return UNKNOWN
    if real == small:
        return None
    cands = [d for d in range(len(real)) if real[d] == n and small[d] == q]
    merged = [
        d for d in range(len(real))
        if d not in cands and real[d] != small[d] and real[d] * q == small[d] * n
    ]  # fmt: skip
    if merged or len(cands) > 1:
        return AMBIGUOUS
    return cands[0] if cands else UNKNOWN


def shapes(items: list[Any]) -> list[Shape]:
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in items]


def _small_batch(x: torch.Tensor, q: int) -> torch.Tensor:
    """The chunk's last ``q`` samples (a cumsum over the batch leaves the first sample
    unchanged; :func:`run` also runs the first ``q`` alone, for couplings that leave the
    last unchanged); when the chunk has no more than ``q``, all of it and perturbed
    copies of its first, ``q + 1`` in all."""
    n = x.shape[0]
    if n > q:
        return x[n - q :]
    x0 = x[:1]
    extra = x0.expand(q + 1 - n, *x.shape[1:]).clone()
    if x.is_floating_point():
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(extra.shape, generator=gen).to(extra)
        extra = extra + 0.5 * x0.abs().mean().clamp_min(1e-3) * noise
    elif x.dim() > 1:
        extra = extra.flatten(1).roll(1, dims=1).view_as(extra)
    return torch.cat([x, extra])


def run(
    forward: Forward,
    modules: list[tuple[str, nn.Module]],
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    keep_graph: bool = False,
) -> Probe | None:
    """The probe of the calls of ``modules`` (name, module) for the chunk ``x`` (before its
    forward), made with ``forward``; ``params``: the selected parameters, by name.
    ``keep_graph``: run its forward with the autograd graph and keep it for
    :meth:`Probe.node_use` (a model with parameters no module rule serves will ask: one
    forward fewer)."""
    for q in (1, 2):  # a model that cannot run on one sample gets a second try with two
        xs = _small_batch(x.detach(), q)  # (a chunk of <= 2 samples: padded to 3)
        calls: list[tuple[str, list[Shape], list[Shape]]] = []

        def record(mname, calls=calls):
            def hook(mod, args, kwargs, out):
                calls.append(
                    (mname, shapes(graph.flatten((args, kwargs))[0]), shapes(graph.tensors(out)))
                )

            return hook

        handles = [
            m.register_forward_hook(record(mn), with_kwargs=True, prepend=True) for mn, m in modules
        ]
        try:
            with torch.set_grad_enabled(keep_graph):
                y = forward(xs)
        except Exception:  # noqa: BLE001 - the model need not run on a batch this small
            continue
        finally:
            for h in handles:
                h.remove()
        y_first = None
        n = x.shape[0]
        if n > q + 1:  # the first sample alone (q = 1), or with the last (q = 2)
            first = x.detach()[:1] if q == 1 else x.detach()[[0, n - 1]]
            try:
                with torch.no_grad():
                    y_first = forward(first)
            except Exception:  # noqa: BLE001 - (it ran on q samples a moment ago)
                y_first = None
        return Probe(xs.shape[0], calls, y.detach(), xs, x.shape[0], forward, params,
                     y_first=y_first, _y_graph=y if keep_graph else None)  # fmt: skip
    return None
