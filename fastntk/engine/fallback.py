"""The exact torch.func fallbacks of the layerwise strategy: per module (a call no rule
serves) and through the whole model (parameters used outside their modules' calls)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, vmap

from fastntk.engine import capture, graph, jacobian, probe
from fastntk.engine.call import Call
from fastntk.profiling import phase
from fastntk.rules import Block, Dense


def module_grads(
    call: Call, rec: capture.Record, gouts: list[torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients of a module's selected parameters via torch.func.

    Re-runs the module on each sample (vmap over the batch dimension, the
    sample kept as a batch of one) and takes the vector-Jacobian product
    with that sample's output gradient.

    Returns:
        attribute -> (n, *parameter shape) per-sample gradients.
    """
    module, (args, kwargs) = rec.module, rec.saved
    copies = call.copies
    bdim = capture.batch_dim(module)
    n = rec.n
    prefix = rec.mname + "." if rec.mname else ""
    state = {
        k[len(prefix) :]: v.detach()
        for d in (copies.params, copies.buffers)
        for k, v in d.items()
        if k.startswith(prefix) or not prefix
    }
    diff = {attr: copies.params[p].detach() for attr, p in rec.attrs.items()}
    const = {k: v for k, v in state.items() if k not in diff}
    flat_args, spec = graph.flatten((args, kwargs))
    g_list = [
        g if g is not None else torch.zeros(sh, dtype=dt, device=dev)
        for g, (sh, dt, dev) in zip(gouts, rec.out_specs, strict=True)
    ]
    if rec.dims is not None and probe.AMBIGUOUS not in rec.dims.ins:  # measured
        in_dims = list(rec.dims.ins)
        gdims = [rec.dims.outs[i] for i in rec.out_pos]
    else:  # assumed: the module's batch dim, where a tensor has the batch's size
        in_dims = [
            bdim if isinstance(a, torch.Tensor) and a.dim() > bdim and a.shape[bdim] == n else None
            for a in flat_args
        ]
        gdims = _output_batch_dims(call, rec, {**const, **diff}, flat_args, spec, in_dims, bdim)
    out_pos = rec.out_pos

    def f(p, *fa_and_g):
        fa = list(fa_and_g[: len(flat_args)])
        gs = fa_and_g[len(flat_args) :]
        fa = [a.unsqueeze(d) if d is not None else a for a, d in zip(fa, in_dims, strict=True)]
        a, kw = graph.unflatten(fa, spec)
        out = copies.functional(module, {**const, **p}, a, kw)
        outs = graph.tensors(out)
        total = 0.0
        for i, g, d in zip(out_pos, gs, gdims, strict=True):
            total = total + (outs[i] * g.unsqueeze(d)).sum()
        return total

    what = f"{rec.mname!r} ({type(module).__name__}, no rule: torch.func fallback)"
    with jacobian.torch_func(what):
        return vmap(grad(f), in_dims=(None, *in_dims, *gdims))(diff, *flat_args, *g_list)


def _output_batch_dims(call: Call, rec, state, flat_args, spec, in_dims, bdim) -> list[int]:
    """The batch dimension of each hooked output of ``rec``'s call.

    One output: the module's (``capture.batch_dim``). Several: found by calling the module on
    its first sample alone and taking, per output, the dimension that is ``n`` in the
    batch call and 1 in that one (``nn.MultiheadAttention(batch_first=False)`` returns
    (T, N, E) outputs but (N, T, S) attention weights).
    """
    if len(rec.out_specs) < 2 or rec.n < 2:
        return [bdim] * len(rec.out_specs)
    one = [
        a.narrow(bdim, 0, 1) if d is not None else a
        for a, d in zip(flat_args, in_dims, strict=True)
    ]
    a, kw = graph.unflatten(one, spec)
    with torch.no_grad():
        out = call.copies.functional(rec.module, state, a, kw)
    every = graph.tensors(out)
    outs = [every[i] for i in rec.out_pos]
    dims = []
    for j, (sh, _, _) in enumerate(rec.out_specs):
        cand = [
            d for d in range(len(sh))
            if outs[j].dim() == len(sh) and sh[d] == rec.n and outs[j].shape[d] == 1
        ]  # fmt: skip
        dims.append(bdim if bdim in cand or not cand else cand[0])
    return dims


def model_blocks(
    call: Call,
    x: torch.Tensor,
    consume: Callable[[tuple, Block], None],
    pnames: list[str],
    npasses: int,
) -> None:
    """Per-sample gradient blocks of ``pnames`` through the whole model (torch.func), fed
    to ``consume`` under the layerwise keys (parameter, row 0, pass)."""
    with phase("fallback"):
        J = jacobian.jacobians(call, x, pnames)  # pname -> (n, npasses, cols)
    for pname in pnames:
        G = J[pname]
        if call.head.full:
            consume((pname, 0, 0), Dense(G.transpose(0, 1).reshape(-1, G.shape[-1])))
        else:
            for k in range(npasses):
                consume((pname, 0, k), Dense(G[:, k]))
