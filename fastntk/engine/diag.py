"""The exact diagonal of the kernel, Θ_ii, in O(N) memory (:func:`fastntk.ntk_diag`).

Where the samples are independent, the layerwise strategy's per-sample gradient blocks
are reduced to each sample's squared norm as they stream past (never a Gram): for a
:class:`~fastntk.rules.Dense` block ``G``, ``Σ_c G_ic²``; for an
:class:`~fastntk.rules.Outer` block ``a_i b_iᵀ``, ``|a_i|² |b_i|²``; summed over the
parameters' blocks and the passes (``"full"``: the K×K products of each sample's K rows).
Where the batch couples the samples (``bn="batch"``, a coupling the probe finds, a
forward torch.func cannot take), each sample's Jacobian rows come from one-hot backward
passes through the batch graph (the coupled strategy's rows), a chunk of rows at a time.
"""

from __future__ import annotations

import torch

from fastntk import _model
from fastntk.engine import capture, classify, coupled, plan, sizes
from fastntk.engine.call import Call
from fastntk.engine.jacobian import CapturedMutationError
from fastntk.engine.layerwise import Layerwise
from fastntk.errors import UntraceableError
from fastntk.rules import Block, Outer


def diagonal(call: Call, x: torch.Tensor) -> torch.Tensor:
    """Θ_ii of the call's plan: (N,), or (N, K, K) for ``output="full"``."""
    if call.plan.strategy == "layerwise":
        try:
            return _layerwise(call, x)
        except (classify.SamplesCoupled, CapturedMutationError, UntraceableError):
            pass  # the batch graph computes it exactly
    return _coupled(call, x)


def _layerwise(call: Call, x: torch.Tensor) -> torch.Tensor:
    n, step = x.shape[0], call.samples
    full = call.head.full
    out: torch.Tensor | None = None
    layerwise = Layerwise(call)
    for s0 in range(0, n, step):
        s1 = min(n, s0 + step)
        m = s1 - s0
        parts: dict[int, torch.Tensor] = {}

        def consume(key, blk: Block, m=m, parts=parts):
            if full:  # blk rows: pass-major (K·m); the K×K products of each sample's rows
                K = blk.n // m
                if isinstance(blk, Outer) and blk.a.dim() == 2:
                    a, b = blk.a.view(K, m, -1), blk.b.view(K, m, -1)
                    d = torch.einsum("kmp,lmp->mkl", a, a) * torch.einsum("kmd,lmd->mkl", b, b)
                else:
                    G = blk.dense().view(K, m, -1)
                    d = torch.einsum("kmc,lmc->mkl", G, G)
            elif isinstance(blk, Outer):
                d = blk.sq_norms()
            else:
                d = blk.dense().pow(2).sum(1)
            parts[0] = d if 0 not in parts else parts[0] + d

        K = layerwise.run_chunk(x[s0:s1], consume, capture.always)
        d = parts.get(0)
        if d is None:
            d = torch.zeros((m, K, K) if full else (m,), dtype=call.dtype, device=call.device)
        if out is None:
            out = torch.empty((n, *d.shape[1:]), dtype=d.dtype, device=d.device)
        out[s0:s1] = d
        if call.head.output == "mean":
            out[s0:s1] /= K
    assert out is not None
    return out


def _coupled(call: Call, x: torch.Tensor) -> torch.Tensor:
    """Θ_ii from Jacobian rows through the batch graph (one forward of the whole batch)."""
    if call.plan.strategy != "coupled":
        call.plan = call.plan.after(plan.SAMPLES_COUPLED) or call.plan
    head = call.head
    xp = x.detach().to(call.dtype) if x.is_floating_point() else x
    with _model.bn_rows_checked(call.model, call.copies, xp, call.bn):
        raw = call.copies.call(call.model, xp)
    y = head(raw, x.shape[0])
    n, K = y.shape
    passes = head.passes(y)
    P = len(passes)
    tensors = [call.copies.params[p] for p in call.selected]
    nparams = sum(t.numel() for t in tensors)
    per = max(1, sizes.JAC_BYTES // max(1, nparams * call.dtype.itemsize) // P)
    batched = call.plan.batched or call.plan.use_vmap
    out = torch.zeros((n, K, K) if head.full else (n,), dtype=call.dtype, device=call.device)
    for i0 in range(0, n, per):
        idx = range(i0, min(n, i0 + per))
        rows = [(i, k) for i in idx for k in range(P)]
        J = coupled._jacobian_rows(y, passes, tensors, rows, batched).view(len(idx), P, -1)
        if head.full:
            out[i0 : i0 + len(idx)] = J @ J.transpose(1, 2)
        else:
            out[i0 : i0 + len(idx)] = J.pow(2).sum((1, 2))
    if head.output == "mean":
        out /= K
    return out
