"""The coupled strategy: samples that interact in the forward (``bn="batch"``, BatchNorm
without running statistics, recurrent models, a coupling the probe found) cannot be
factorised per sample, so each sample's outputs are differentiated through the shared
batch graph: one forward of the whole batch, one one-hot backward per (sample, pass) row,
batched with ``is_grads_batched`` where the plan says so."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastntk import _model
from fastntk.engine import sizes
from fastntk.engine.call import Call
from fastntk.profiling import count_gram, phase


def kernel(
    call: Call,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    block: tuple[list[int], list[int]] | None = None,
) -> torch.Tensor:
    """Exact Θ(x1, x2) through the graph of one forward of the batch [x1; x2].

    ``block``: (row samples, column samples), indices into the batch: only that block of
    the batch's kernel, Θ(x1)[rows][:, cols] (x2 None), with Jacobian rows computed for
    those samples alone (``fastntk.engine.ntk_block``: a tile of a distributed kernel)."""
    batched = call.plan.batched or call.plan.use_vmap
    x = x1 if x2 is None else torch.cat([x1, x2])
    n = x.shape[0]
    if block is None:
        n1 = x1.shape[0]
        A_idx = list(range(n1))
        B_idx = A_idx if x2 is None else list(range(n1, n))
    else:
        A_idx, B_idx = block
    sym = A_idx == B_idx
    head, dtype = call.head, call.dtype
    names = list(call.selected)
    xp = x.detach().to(dtype) if x.is_floating_point() else x
    with phase("forward"), _model.bn_rows_checked(call.model, call.copies, xp, call.bn):
        raw = call.copies.call(call.model, xp)
    y = head(raw, n)
    passes = head.passes(y)
    P = len(passes)
    tensors = [call.copies.params[p] for p in names]
    nparams = sum(t.numel() for t in tensors)
    need = A_idx if sym else sorted(set(A_idx) | set(B_idx))  # the samples with rows
    pos = {i: r for r, i in enumerate(need)}
    # rows (sample i, pass k): grad_outputs = e_i (x) w_k
    rows = [(i, k) for k in range(P) for i in need]
    per_chunk = max(1, min(len(rows), sizes.JAC_BYTES // max(1, nparams * dtype.itemsize)))

    def jac_rows(sub: list[tuple[int, int]]) -> torch.Tensor:
        with phase("jacobian"):
            return _jacobian_rows(y, passes, tensors, sub, batched)

    if len(rows) * nparams * dtype.itemsize <= 2 * sizes.JAC_BYTES:
        J = torch.cat([jac_rows(rows[s : s + per_chunk]) for s in range(0, len(rows), per_chunk)])
        J = J.view(P, len(need), -1)
        A = J[:, [pos[i] for i in A_idx]]
        B = A if sym else J[:, [pos[j] for j in B_idx]]
        with phase("gram"):
            if head.full:
                A2, B2 = A.reshape(P * len(A_idx), -1), B.reshape(P * len(B_idx), -1)
                count_gram(A2.shape[0], B2.shape[0], A2.shape[1])
                theta = A2 @ B2.T
            else:
                count_gram(A.shape[1], B.shape[1], A.shape[0] * A.shape[2])
                theta = torch.einsum("kic,kjc->ij", A, B)
    else:  # too many rows to hold: panels of rows, recomputing the others
        theta = _panels(call, jac_rows, per_chunk, A_idx, B_idx, P)
    return head.finish(theta, len(A_idx), len(B_idx), y.shape[1])


def _jacobian_rows(y, passes, tensors, sub, batched: bool) -> torch.Tensor:
    """(len(sub), P) Jacobian rows of the (sample, pass) rows ``sub``: one-hot backward
    passes, batched (``is_grads_batched``) where asked and possible, else a loop."""
    if batched:
        E = torch.zeros(len(sub), *y.shape, dtype=y.dtype, device=y.device)
        for r, (i, k) in enumerate(sub):
            E[r, i] = passes[k][i]
        try:
            gs = torch.autograd.grad(
                y, tensors, grad_outputs=E, retain_graph=True, is_grads_batched=True,
                allow_unused=True,
            )  # fmt: skip
            return torch.cat(
                [
                    _zeros_if_none(g, t, len(sub)).reshape(len(sub), -1)
                    for g, t in zip(gs, tensors, strict=True)
                ],
                1,
            )
        except RuntimeError:
            pass  # an op without a batching rule: fall back to a loop
    out = []
    for i, k in sub:
        E = torch.zeros_like(y)
        E[i] = passes[k][i]
        gs = torch.autograd.grad(y, tensors, grad_outputs=E, retain_graph=True, allow_unused=True)
        out.append(
            torch.cat([_zeros_if_none(g, t).reshape(-1) for g, t in zip(gs, tensors, strict=True)])
        )
    return torch.stack(out)


def _panels(
    call: Call,
    jac_rows: Callable[[list[tuple[int, int]]], torch.Tensor],
    per_chunk: int,
    A_idx: list[int],
    B_idx: list[int],
    P: int,
) -> torch.Tensor:
    """The (R·|A|, R·|B|) kernel of the row samples ``A_idx`` against the column samples
    ``B_idx`` from panels of ``per_chunk`` Jacobian rows, each row panel against every
    column panel (the column rows recomputed per row panel)."""
    full = call.head.full
    R = P if full else 1
    theta = call.alloc(len(A_idx), len(B_idx), R).view(R, len(A_idx), R, len(B_idx))
    left = [(a, i, k) for k in range(P) for a, i in enumerate(A_idx)]
    right = [(b, j, k) for k in range(P) for b, j in enumerate(B_idx)]
    for a0 in range(0, len(left), per_chunk):
        A_rows = left[a0 : a0 + per_chunk]
        A = jac_rows([(i, k) for _, i, k in A_rows])
        for b0 in range(0, len(right), per_chunk):
            B_rows = right[b0 : b0 + per_chunk]
            B = jac_rows([(j, k) for _, j, k in B_rows])
            with phase("gram"):
                count_gram(A.shape[0], B.shape[0], A.shape[1])
                blk = A @ B.T
            for ra, (a, _, ka) in enumerate(A_rows):
                for rb, (b, _, kb) in enumerate(B_rows):
                    if full:
                        theta[ka, a, kb, b] += blk[ra, rb]
                    elif ka == kb:
                        theta[0, a, 0, b] += blk[ra, rb]
    return theta.view(R * len(A_idx), R * len(B_idx))


def _zeros_if_none(g, t, batch=None):
    if g is not None:
        return g
    shape = t.shape if batch is None else (batch, *t.shape)
    return torch.zeros(shape, dtype=t.dtype, device=t.device)
