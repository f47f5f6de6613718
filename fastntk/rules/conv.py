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

Strategies (one per layer shape; all exact, they differ in summation order):

* 1x1, stride 1: no unfolding, the input is its own patch matrix: one bmm.
* large output maps (T >= 256 positions, e.g. NB201 stage 1 at 32x32): the
  weight gradient of a grouped convolution in which every sample is a group
  (ATen's ``convolution_backward`` for the weight only; no patch buffer).
* otherwise: patches as strided windows (``Tensor.unfold``), copied once into
  (n, C_in*k, T) and one bmm.

Measured on the 2-core development CPU, N=128, best of 3, seconds
(``python bench/bench_engine_choices.py conv``, bench/results/engine_choices_cpu.md):
16->16 ch 3x3 at 32x32: unfold+bmm 0.065, strided 0.049, grouped 0.009, C++ op 0.010;
64->64 ch 3x3 at 8x8: strided 0.011, grouped 0.039; 1x1 at 32x32: direct 0.0025.
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
    if _is_pointwise(module):
        return x.reshape(n, c, -1)
    # windows as strided views, then one copy into patch-major layout.
    w = _pad(module, x)
    for j in range(nd):
        span = d[j] * (k[j] - 1) + 1
        w = w.unfold(2 + j, span, s[j])[..., :: d[j]]
    # w: (n, c, *out_spatial, *k) -> (n, c, *k, *out_spatial)
    perm = [0, 1] + list(range(2 + nd, 2 + 2 * nd)) + list(range(2, 2 + nd))
    return w.permute(perm).reshape(n, c * _prod(k), -1)


def _is_pointwise(module: nn.Module) -> bool:
    return (
        all(v == 1 for v in module.kernel_size)
        and all(v == 1 for v in module.stride)
        and not any(module._reversed_padding_repeated_twice)
    )


def _grouped_weight_grad(module, x, g, h0, h1):
    """Per-sample weight gradients of groups h0:h1 as one grouped conv weight gradient.

    Samples become groups: input (1, n*C_in_g, ...), output grad (1, n*C_out_g, ...),
    groups = n * (h1 - h0); the result (n*C_out_g, C_in/groups, *k) is per sample.
    """
    nd = len(module.kernel_size)
    n = x.shape[0]
    groups = module.groups
    cin_g = x.shape[1] // groups
    og = g.shape[1] // groups
    xs = x[:, h0 * cin_g : h1 * cin_g]
    gs = g[:, h0 * og : h1 * og]
    pads = module._reversed_padding_repeated_twice
    symmetric = all(pads[2 * j] == pads[2 * j + 1] for j in range(nd))
    if module.padding_mode == "zeros" and symmetric:
        padding = [pads[2 * (nd - 1 - j)] for j in range(nd)]
    else:
        xs, padding = _pad(module, xs), [0] * nd
    ng = n * (h1 - h0)
    wshape = (ng * og, cin_g, *module.kernel_size)
    dummy = gs.new_empty(1).expand(wshape)
    _, gw, _ = torch.ops.aten.convolution_backward(
        gs.reshape(1, ng * og, *gs.shape[2:]),
        xs.reshape(1, ng * cin_g, *xs.shape[2:]),
        dummy,
        None,
        list(module.stride),
        padding,
        list(module.dilation),
        False,
        [0] * nd,
        ng,
        [False, True, False],
    )
    return gw.reshape(n, (h1 - h0) * og, -1)


def _compiled_weight_grad(module, x, gout, backend, T):
    """fastntk's own kernels for 2-D convolutions: Triton (``method="triton"``), or the C++
    op for ``backend="csrc"`` (maps of >= 1024 positions; not chosen by ``"auto"``, see
    the module docstring). Returns (n, C_out, C_in/groups, kh, kw) or None."""
    if len(module.kernel_size) != 2 or backend == "torch":
        return None
    pads = module._reversed_padding_repeated_twice
    if module.padding_mode == "zeros" and pads[0] == pads[1] and pads[2] == pads[3]:
        xs, padding = x, (pads[2], pads[0])
    else:
        xs, padding = _pad(module, x), (0, 0)
    kw = dict(
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=padding,
        dilation=module.dilation,
        groups=module.groups,
    )
    if backend == "triton":
        from fastntk.kernels.conv_psg import conv2d_psg

        return conv2d_psg(xs, gout, **kw)
    if backend == "csrc" and T >= 1024 and x.device.type == "cpu":
        from fastntk import _ext

        if x.dtype in (torch.float32, torch.float64) and _ext.available():
            return _ext.conv2d_psg(xs, gout, **kw)
    return None


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
        return (args[0], ctx.backend)

    def grad_rows_multi(self, module, saved, gouts, name, r0, r1):
        # Several logits' output gradients of one ungrouped convolution: stacked as
        # K*C_out output channels they share one patch matrix, and every sample's
        # gradients for all K logits come from one (K*C_out x T) @ (T x C_in*k) product.
        # NB201 "trace" at N=32 on the 2-core CPU: 3.32 s all logits at once vs 3.53 s
        # logit by logit (median of 5 alternating runs, python
        # bench/bench_engine_choices.py trace; bench/results/engine_choices_cpu.md).
        if name != "weight" or module.groups != 1 or len(gouts) == 1:
            return super().grad_rows_multi(module, saved, gouts, name, r0, r1)
        x, backend = saved
        K, nd = len(gouts), len(module.kernel_size)
        if backend != "torch":  # the compiled kernels take the stacked gradients as one
            G = self.grad_rows(module, saved, torch.cat(gouts, 1), name, 0, K * gouts[0].shape[1]).G
        else:
            if x.dim() == nd + 1:
                x, gouts = x.unsqueeze(0), [g.unsqueeze(0) for g in gouts]
            n = x.shape[0]
            U = unfold_patches(module, x)  # (n, C_in*k, T)
            g = torch.cat(gouts, 1).reshape(n, -1, U.shape[-1])  # (n, K*C_out, T)
            G = torch.bmm(g, U.transpose(1, 2))  # (n, K*C_out, C_in*k)
        n, c_out = G.shape[0], gouts[0].shape[1]
        G = G.reshape(n, K, c_out, -1)[:, :, r0:r1]
        return [Dense(G[:, k].reshape(n, -1)) for k in range(K)]

    def grad_rows(self, module, saved, gout, name, r0, r1):
        x, backend = saved
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
        if x.dim() == nd + 1:
            x = x.unsqueeze(0)
        compiled = _compiled_weight_grad(module, x, gout, backend, g.shape[-1])
        if compiled is not None:
            G = compiled.reshape(n, c_out, -1)[:, r0:r1]
            return Dense(G.reshape(n, -1))
        if g.shape[-1] >= 256 and not _is_pointwise(module):
            G = _grouped_weight_grad(module, x, gout, h0, h1)
            return Dense(G[:, r0 - h0 * og : r1 - h0 * og].reshape(n, -1))
        U = unfold_patches(module, x)  # (n, C_in*K, T)
        T = U.shape[-1]
        cgk = U.shape[1] // groups
        Ug = U.reshape(n, groups, cgk, T)[:, h0:h1]  # (n, hg, cgk, T)
        gg = g.reshape(n, groups, og, T)[:, h0:h1]  # (n, hg, og, T)
        hg = h1 - h0
        G = torch.matmul(gg, Ug.transpose(-1, -2))  # (n, hg, og, cgk)
        G = G.reshape(n, hg * og, cgk)[:, r0 - h0 * og : r1 - h0 * og]
        return Dense(G.reshape(n, -1))
