"""Gram rule of ``nn.Linear`` on 2-D and N-D (token) inputs.

Derivation. ``y[i, t] = W u[i, t] + b`` for sample ``i`` and position ``t``
(``t`` runs over all middle dimensions; ``T = 1`` for 2-D inputs). With
``g[i, t] = df_i/dy[i, t]``:

    dW_i = sum_t g[i, t] u[i, t]^T          (out x in)
    db_i = sum_t g[i, t]                    (out)

For ``T = 1`` the per-sample weight gradient is the outer product
``g_i u_i^T``, returned as an :class:`Outer` block whose Gram costs
``n^2 (out + in)`` instead of ``n^2 out in``. For ``T > 1`` it is one batched
matmul ``g_i^T u_i`` over the tokens; with ``method="triton"`` fastntk's Triton
kernel computes it (:func:`fastntk.kernels.conv_psg.linear_psg`, float32 accumulation).
With few positions (``outer_pays``: ConvNeXt's pointwise layers on its 2x2 last stage)
the block is an :class:`Outer` with positions instead, whose Gram never forms G.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastntk import rules
from fastntk.rules import Dense, GramRule, Outer, outer_pays, register_gram_rule


@register_gram_rule(nn.Linear)
class LinearRule(GramRule):
    param_names = ("weight", "bias")
    supports_rows = True
    supports_out = True

    def save(self, module, args, kwargs, output, ctx):
        return (args[0], ctx.backend)

    def block_cap(self, module, saved):
        # tokens: the dense blocks come from a batched matmul over T positions (memory-bound
        # for short T); not where Outer blocks with positions pay (no G is formed)
        u, backend = saved
        if u.dim() <= 2 or backend not in ("torch", "auto"):
            return None
        T = u[0].numel() // u.shape[-1]
        if outer_pays(2**62, T, module.out_features, u.shape[-1]):
            return None
        return rules.CACHE_BLOCK_BYTES

    def grad_rows(self, module, saved, gout, name, r0, r1, out=None):
        u, backend = saved
        n = gout.shape[0]
        g = gout[..., r0:r1]
        if u.dim() <= 2:  # one position per sample
            g2 = g.reshape(n, r1 - r0)
            if name == "bias":
                return Dense(g2)
            return Outer(g2, u.reshape(n, -1))
        g3 = g.reshape(n, -1, r1 - r0)  # (n, T, rows)
        if name == "bias":
            return Dense(g3.sum(1))
        u3 = u.reshape(n, -1, u.shape[-1])  # (n, T, in)
        if backend in ("torch", "auto") and outer_pays(n, u3.shape[1], r1 - r0, u3.shape[2]):
            return Outer(g3, u3)
        if backend == "triton":
            from fastntk.kernels.conv_psg import linear_psg

            return Dense(linear_psg(u3, g3).reshape(n, -1))
        G = None if out is None else out.view(n, r1 - r0, u3.shape[2])  # reused memory
        return Dense(torch.bmm(g3.transpose(1, 2), u3, out=G).reshape(n, -1))
