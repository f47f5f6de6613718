"""Blockwise assembly of a kernel over more samples than one chunk: a *panel* of rows
keeps its chunks' per-sample gradient blocks while the column chunks stream past it."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from fastntk import _model
from fastntk._progress import bar as progress_bar
from fastntk.engine import capture, gram, sizes
from fastntk.engine.call import Call
from fastntk.rules import Block

if TYPE_CHECKING:
    from fastntk.engine.layerwise import Layerwise


def outputs(call: Call, x: torch.Tensor) -> int:
    """K, the model's outputs per sample, from a forward of the first chunk of ``x``
    without the graph (the model may not run on fewer samples, e.g. one that groups
    them)."""
    xs = call.prep(x[: min(call.samples, x.shape[0])])
    with torch.no_grad():
        return call.head(call.copies.call(call.model, xs, samples=_model.ROWS)).shape[1]


def bytes_per_sample(call: Call, K: int | None, x: torch.Tensor) -> int:
    """Bytes of one sample's per-sample gradients over all backward passes (K for
    "trace", "mean" and "full", else 1; K from :func:`outputs` where None)."""
    passes = 1
    if not call.head.one_pass:
        passes = max(1, outputs(call, x) if K is None else K)
    return sum(p.numel() for p in call.selected.values()) * call.dtype.itemsize * passes


def rows(call: Call, x: torch.Tensor, K: int | None = None) -> tuple[int, int]:
    """(rows of a panel, bytes of one sample's per-sample gradients) for the samples ``x``
    of a model with K outputs (None: unknown yet): as many rows, in whole chunks, as the
    panel budget holds, of every backward pass (the K passes of "trace"/"mean" are kept
    alike: counting one made a "trace" panel hold K times the budget)."""
    c = call.samples
    per_sample = max(1, bytes_per_sample(call, K, x))
    return max(c, (sizes.panel_budget(call.device) // per_sample) // c * c), per_sample


def kernel(lw: Layerwise, x1: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
    """Θ(x1, x2) assembled blockwise from chunks of ``lw.call.samples`` samples."""
    call = lw.call
    sym = x2 is None
    xb = x1 if sym else x2
    n1, n2 = x1.shape[0], xb.shape[0]
    c = call.samples
    panel, _ = rows(call, x1)
    col_chunks = [(s, min(n2, s + c)) for s in range(0, n2, c)]
    panels = [(s, min(n1, s + panel)) for s in range(0, n1, panel)]
    theta: torch.Tensor | None = None
    total = sum(-(-(p1 - p0) // c) for p0, p1 in panels) + sum(
        len([b for b in col_chunks if not sym or b[0] >= p1]) for _, p1 in panels
    )
    show = False if call.progress is None and total <= 2 else call.progress
    bar = progress_bar(total, "ntk", "chunk", show)  # None: on a terminal

    for p0, p1 in panels:
        store: dict[tuple, list[Block]] = defaultdict(list)
        for s0 in range(p0, p1, c):
            s1 = min(p1, s0 + c)
            K = lw.run_chunk(x1[s0:s1], lambda k, b, store=store: store[k].append(b))
            bar.update()
        R = call.head.rows(K)
        stored = {k: gram.regroup(v, R) for k, v in store.items()}  # rows (R, panel)
        store = None
        if theta is None:
            theta = call.alloc(n1, n2, R)
        t4 = theta.view(R, n1, R, n2)
        if sym:
            blk = sum(gram.gram_block(b, b, call.backend) for b in stored.values())
            if isinstance(blk, torch.Tensor):
                t4[:, p0:p1, :, p0:p1] += blk.view(R, p1 - p0, R, p1 - p0)
        for b0, b1 in col_chunks:
            if sym and b0 < p1:
                continue

            def consume(key, blk, b0=b0, b1=b1, stored=stored, t4=t4, p0=p0, p1=p1, R=R):
                a = stored.get(key)
                if a is not None:
                    t4[:, p0:p1, :, b0:b1] += gram.gram_block(a, blk, call.backend).view(
                        R, p1 - p0, R, b1 - b0
                    )

            lw.run_chunk(xb[b0:b1], consume, capture.always)
            bar.update()
        stored = None
    bar.close()
    assert theta is not None
    if sym:
        R = theta.shape[0] // n1
        t4 = theta.view(R, n1, R, n1)
        for p0, p1 in panels:
            # mirror the blocks right of each diagonal panel into the lower triangle
            t4[:, p1:, :, p0:p1] = t4[:, p0:p1, :, p1:].permute(2, 3, 0, 1)
    return call.head.finish(theta, n1, n2, K)
