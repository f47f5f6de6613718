"""Gram rule of ``nn.Embedding``.

Derivation. ``y[i, t] = W[idx[i, t]]``, so the per-sample gradient is a
scatter of the output gradients into the rows of the table:

    dW_i[v] = sum_{t : idx[i, t] = v} g[i, t]      (zero for ``padding_idx``)

The block for rows ``r0:r1`` of the table is built with one ``index_add``.
``sparse`` embeddings take the same rule; ``max_norm`` and ``scale_grad_by_freq``
embeddings are refused before any forward (``_model.check_model``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastntk.rules import Dense, GramRule, register_gram_rule


@register_gram_rule(nn.Embedding)
class EmbeddingRule(GramRule):
    param_names = ("weight",)
    supports_rows = True

    def covers(self, module):
        return not module.scale_grad_by_freq and module.max_norm is None

    def save(self, module, args, kwargs, output, ctx):
        return args[0]

    def grad_rows(self, module, idx, gout, name, r0, r1):
        n, d = gout.shape[0], gout.shape[-1]
        idx = idx.reshape(n, -1)
        g = gout.reshape(n, -1, d)
        T = idx.shape[1]
        keep = (idx >= r0) & (idx < r1)
        if module.padding_idx is not None:
            keep &= idx != module.padding_idx
        rows = r1 - r0
        flat = (torch.arange(n, device=idx.device).unsqueeze(1) * rows + (idx - r0)).reshape(-1)
        src = (g * keep.unsqueeze(2).to(g.dtype)).reshape(n * T, d)
        flat = torch.where(keep.reshape(-1), flat, torch.zeros_like(flat))
        out = torch.zeros(n * rows, d, dtype=g.dtype, device=g.device)
        out.index_add_(0, flat, src)
        return Dense(out.reshape(n, rows * d))
