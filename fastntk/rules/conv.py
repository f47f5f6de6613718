"""Gram rule of ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

Derivation. With the (padded) input unfolded into patches
``u[i, t] in R^{C_in/groups * prod(k)}`` per output position ``t`` and group
``h``, the convolution is ``y[i, h, :, t] = W_h u[i, h, t]`` (+ bias), so

    dW_{i,h} = sum_t g[i, h, :, t] u[i, h, t]^T      (C_out/groups x C_in/groups*prod(k))
    db_i     = sum_t g[i, :, t]

computed as one batched matmul over (sample, group) pairs: no groups x groups
block is formed and discarded (depthwise convolutions cost what they should).
The row order of ``dW`` is the weight's own layout ``(C_out, C_in/groups, *k)``.

Padding: the module's own ``_reversed_padding_repeated_twice`` (which also
encodes ``padding="same"``) is applied with the module's ``padding_mode``;
stride and dilation select the patch positions.

Unfolding: 2-D convolutions use ``F.unfold`` (ATen's im2col); 1-D ones are
2-D ones with height 1; 3-D ones use strided views (``Tensor.unfold``).
A 1x1 convolution with stride 1 needs no unfolding at all: the input is its
own patch matrix.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastntk.rules import Dense, GramRule, register_gram_rule


def _pad(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    pads = module._reversed_padding_repeated_twice
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def unfold_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches of a convolution's input: (n, C_in * prod(k), T), channel-major.

    Args:
        module: an ``nn.Conv{1,2,3}d``.
        x: its input, (n, C_in, *spatial) (or unbatched (C_in, *spatial)).
    """
    nd = len(module.kernel_size)
    if x.dim() == nd + 1:  # unbatched input
        x = x.unsqueeze(0)
    n, c = x.shape[:2]
    k, s, d = module.kernel_size, module.stride, module.dilation
    if all(v == 1 for v in k) and all(v == 1 for v in s) and not any(
        module._reversed_padding_repeated_twice
    ):
        return x.reshape(n, c, -1)
    xp = _pad(module, x)
    if nd == 2:
        return F.unfold(xp, k, dilation=d, padding=0, stride=s)
    if nd == 1:
        return F.unfold(xp.unsqueeze(2), (1, k[0]), dilation=(1, d[0]), padding=0, stride=(1, s[0]))
    # N-d: windows as strided views, then one copy into patch-major layout.
    w = xp
    for j in range(nd):
        span = d[j] * (k[j] - 1) + 1
        w = w.unfold(2 + j, span, s[j])[..., :: d[j]]
    # w: (n, c, *out_spatial, *k) -> (n, c, *k, *out_spatial)
    perm = [0, 1] + list(range(2 + nd, 2 + 2 * nd)) + list(range(2, 2 + nd))
    return w.permute(perm).reshape(n, c * _prod(k), -1)


def _prod(t) -> int:
    p = 1
    for v in t:
        p *= v
    return p


@register_gram_rule(nn.Conv1d)
@register_gram_rule(nn.Conv2d)
@register_gram_rule(nn.Conv3d)
class ConvRule(GramRule):
    param_names = ("weight", "bias")
    supports_rows = True

    def save(self, module, args, kwargs, output, ctx):
        return args[0]

    def grad_rows(self, module, x, gout, name, r0, r1):
        nd = len(module.kernel_size)
        if gout.dim() == nd + 1:
            gout = gout.unsqueeze(0)
        n, c_out = gout.shape[:2]
        g = gout.reshape(n, c_out, -1)  # (n, C_out, T)
        if name == "bias":
            return Dense(g[:, r0:r1].sum(2))
        groups = module.groups
        og = c_out // groups
        h0, h1 = r0 // og, -(-r1 // og)  # groups touched by rows r0:r1
        U = unfold_patches(module, x)  # (n, C_in*K, T)
        T = U.shape[-1]
        cgk = U.shape[1] // groups
        Ug = U.reshape(n, groups, cgk, T)[:, h0:h1]  # (n, hg, cgk, T)
        gg = g.reshape(n, groups, og, T)[:, h0:h1]  # (n, hg, og, T)
        hg = h1 - h0
        G = torch.matmul(gg, Ug.transpose(-1, -2))  # (n, hg, og, cgk)
        G = G.reshape(n, hg * og, cgk)[:, r0 - h0 * og : r1 - h0 * og]
        return Dense(G.reshape(n, -1))
