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

* few output positions (``outer_pays``: ResNet's and ConvNeXt's last stages, T = 2x2 or
  4x4): no per-sample gradient is formed; the block is ``Outer(g, u)`` with positions,
  whose Gram is ``sum_{t,s} <g_it, g_js> <u_it, u_js>``.
* 1x1, stride 1, no padding: the input is its own patch matrix: one bmm.
* one input channel per group (depthwise): a forward convolution in which the samples'
  channels are the groups and the output gradients the filters.
* output maps of at least ``GROUPED_MIN_T`` = 64 positions: the weight gradient of a
  grouped convolution in which every sample is a group (ATen's
  ``convolution_backward`` for the weight only; no patch buffer), in sample chunks of at
  most ``GROUPED_CHUNK_BYTES`` of result.
* smaller maps: patches as strided windows (``Tensor.unfold``), copied once into reused
  scratch memory (n, C_in*k, T), and one bmm.

Rows r0:r1 of an ungrouped convolution are its output channels r0:r1: only their
gradients enter the product. With ``out`` (reused engine memory for blocks consumed at
once) the block is written there instead of into a new tensor.

Measured on the 2-core development CPU (AMD EPYC, AVX-512), N=128, best of 5, ms
(``python bench/bench_engine_choices.py conv``, bench/results/engine_choices_cpu.md):
16->16 ch 3x3 at 32x32: strided 11.2, grouped 2.7, C++ op 4.5; 64->64 ch 3x3 at 8x8:
strided 6.0, grouped in one call 15.9 (13,792 page faults per call), grouped in chunks
4.3; 256->256 ch 3x3 at 4x4: strided 24, grouped in chunks 34.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastntk.rules import Dense, GramRule, Outer, outer_pays, register_gram_rule

# The grouped strategy runs in sample chunks whose result is at most this big. ATen's grouped
# weight gradient allocates its result and oneDNN scratch of a few times that size per call;
# glibc returns freed blocks of tens of MB to the system and page-faults them in again on the
# next call, depending on the process's heap history. Small chunks keep every allocation
# small. On the 2-core AMD EPYC (bench/results/engine_choices_cpu.md): one call of 128
# samples at 64 ch 8x8 took 15.9 ms with 13,792 page faults, 1 MiB chunks 4.3 ms with none
# (python bench/bench_engine_choices.py conv); inside ntk() (NB201 "sum", N=128) the 64-ch
# layers took 213 ms with 183,840 faults in one call per layer, 92 ms in 1 MiB chunks and
# 94 ms in 4 MiB chunks (python bench/bench_engine_choices.py chunks). At N=64 one call was
# the fastest (30 ms vs 44 ms): 1 MiB bounds the worst case, it does not win every shape.
GROUPED_CHUNK_BYTES = 2**20
# Output positions from which the grouped strategy is used (below: strided patches + bmm).
# In bench/results/engine_choices_cpu.md (N=128, 3x3) the grouped chunks win at 32x32 and
# 16x16 and at 64 ch 8x8 (4.3 vs 6.0 ms), lose at 128 ch 8x8 (21.3 vs 18.5 ms) and at 4x4.
GROUPED_MIN_T = 64
# Whether groups of one input channel take the forward-convolution strategy
# (_depthwise_weight_grad, which has the measurements; False: the strategies below).
DEPTHWISE_FORWARD = True


def _pad(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    pads = module._reversed_padding_repeated_twice
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def _aten_padding(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(input, padding) for an ATen-style call that pads symmetrically with zeros itself:
    the module's padding per spatial dim where it is symmetric zero padding, else the input
    padded here (``_pad``: asymmetric ``padding="same"``, reflect/replicate/circular) and 0."""
    nd = len(module.kernel_size)
    pads = module._reversed_padding_repeated_twice  # (last dim left, right, ..., first dim)
    if module.padding_mode == "zeros" and all(pads[2 * j] == pads[2 * j + 1] for j in range(nd)):
        return x, [pads[2 * (nd - 1 - j)] for j in range(nd)]
    return _pad(module, x), [0] * nd


def unfold_patches(
    module: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Patches of a convolution's input: (n, C_in * prod(k), T), channel-major.

    Args:
        module: an ``nn.Conv{1,2,3}d``.
        x: its input, (n, C_in, *spatial) (or unbatched (C_in, *spatial)).
        out: optional contiguous tensor of n * C_in * prod(k) * T elements to write the
            patches into (reused scratch memory); ignored for pointwise convolutions,
            whose patches are the input itself.
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
    w = w.permute(perm)
    if out is None:
        return w.reshape(n, c * _prod(k), -1)
    return out.view(w.shape).copy_(w).view(n, c * _prod(k), -1)


def _is_pointwise(module: nn.Module) -> bool:
    return (
        all(v == 1 for v in module.kernel_size)
        and all(v == 1 for v in module.stride)
        and not any(module._reversed_padding_repeated_twice)
    )


def _grouped_weight_grad(module, xs, gs, hg, out=None):
    """Per-sample weight gradients as the weight gradient of one grouped convolution.

    Samples become groups: input (1, n*C_in_g*hg, ...), output gradient
    (1, n*og*hg, ...), groups = n * hg; the result (n*hg*og, C_in_g, *k) is per sample.
    ``xs`` holds the input channels of ``hg`` consecutive groups of the module, ``gs``
    the output gradients of the same groups (``og`` channels each: a subset of a
    group's channels when ``hg == 1``). Computed in sample chunks of at most
    ``GROUPED_CHUNK_BYTES`` of result; several chunks are written into ``out``
    (n, hg*og, D) when given, a single one is returned as ATen made it.
    """
    nd = len(module.kernel_size)
    n = xs.shape[0]
    cin_g = xs.shape[1] // hg
    og = gs.shape[1] // hg
    xs, padding = _aten_padding(module, xs)
    D = cin_g * _prod(module.kernel_size)
    per_sample = hg * og * D * gs.element_size()
    chunk = max(1, min(n, GROUPED_CHUNK_BYTES // max(1, per_sample)))
    if out is not None:
        out = out.view(n, hg * og, D)
    elif chunk < n:
        out = gs.new_empty(n, hg * og, D)
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        ng = (s1 - s0) * hg
        dummy = gs.new_empty(1).expand(ng * og, cin_g, *module.kernel_size)
        _, gw, _ = torch.ops.aten.convolution_backward(
            gs[s0:s1].reshape(1, ng * og, *gs.shape[2:]),
            xs[s0:s1].reshape(1, ng * cin_g, *xs.shape[2:]),
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
        gw = gw.view(s1 - s0, hg * og, D)
        if chunk == n:  # one chunk: the result as it is
            return gw
        out[s0:s1].copy_(gw)
    return out


def _patches_weight_grad(module, ctx, xs, gs, hg, out=None):
    """Per-sample weight gradients as patches (strided windows, or the input itself for
    pointwise convolutions) times output gradients: one batched matmul.

    Arguments as :func:`_grouped_weight_grad`; the patches go to reused scratch memory.
    """
    n, c = xs.shape[:2]
    T = gs[0, 0].numel()
    if _is_pointwise(module):
        U = xs.reshape(n, c, T)
    else:
        size = (n * c * _prod(module.kernel_size) * T,)
        U = unfold_patches(module, xs, ctx.scratch("conv.patches", size, xs))
    og = gs.shape[1] // hg
    g = gs.reshape(n, hg, og, T)
    if hg == 1:
        G = out.view(n, og, U.shape[1]) if out is not None else None
        return torch.bmm(g[:, 0], U.transpose(1, 2), out=G)
    Ug = U.reshape(n, hg, U.shape[1] // hg, T)
    G = torch.matmul(g, Ug.transpose(-1, -2))  # (n, hg, og, cgk)
    return G.reshape(n, hg * og, -1)


def _depthwise_weight_grad(module, xs, gs, hg):
    """Per-sample weight gradients of a convolution with one input channel per group
    (depthwise: ConvNeXt's 7x7) as one *forward* convolution: the input's channels of
    all samples are the groups, the output gradients the filters,

        dW[i, o, a] = sum_u g[i, o, u] x_pad[i, c(o), stride * u + dilation * a],

    a correlation in which the module's stride becomes the dilation and its dilation the
    stride. Arguments as :func:`_grouped_weight_grad` (``hg`` groups of one channel).
    On the 2-core CPU, N=64, 2 threads, against the best of the strategies above: 64 ch
    7x7 at 8x8, 0.26 vs 4.9 ms; at 4x4, 0.13 vs 2.1 ms; 128 ch 7x7 at 2x2, 1.2 vs 2.6 ms;
    32 ch 3x3 at 16x16, level (0.22 ms) (``python bench/bench_engine_choices.py
    depthwise``, bench/results/engine_choices_cpu.md)."""
    nd = len(module.kernel_size)
    n = xs.shape[0]
    og = gs.shape[1] // hg
    xs, padding = _aten_padding(module, xs)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    dW = conv(
        xs.reshape(1, n * hg, *xs.shape[2:]),
        gs.reshape(n * hg * og, 1, *gs.shape[2:]),
        None,
        module.dilation,
        padding,
        module.stride,
        n * hg,
    )  # (1, n*hg*og, *at least k): the taps past k are cropped
    dW = dW[(0, slice(None)) + tuple(slice(0, k) for k in module.kernel_size)]
    return dW.reshape(n, hg * og, -1)


def _weight_grad(module, ctx, xs, gs, hg, out=None):
    """(n, hg*og, D) per-sample weight gradients by the strategy for this shape."""
    if DEPTHWISE_FORWARD and xs.shape[1] == hg and not _is_pointwise(module):
        return _depthwise_weight_grad(module, xs, gs, hg)
    if gs[0, 0].numel() >= GROUPED_MIN_T and not _is_pointwise(module):
        return _grouped_weight_grad(module, xs, gs, hg, out)
    return _patches_weight_grad(module, ctx, xs, gs, hg, out)


def _compiled_weight_grad(module, x, gout, backend, T, groups=None):
    """fastntk's own kernels for 2-D convolutions: Triton (``method="triton"``), or the C++
    op for ``backend="csrc"`` (not chosen by ``"auto"``, see the module docstring).
    ``groups``: of the channels passed (a slice of whole groups), default the module's.
    Returns (n, C_out, C_in/groups, kh, kw) or None."""
    if len(module.kernel_size) != 2 or backend not in ("triton", "csrc"):
        return None
    xs, padding = _aten_padding(module, x)
    kw = dict(
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=padding,
        dilation=module.dilation,
        groups=module.groups if groups is None else groups,
    )
    if backend == "triton":
        from fastntk.kernels.conv_psg import conv2d_psg

        return conv2d_psg(xs, gout, **kw)
    if x.dtype in (torch.float32, torch.float64):
        from fastntk import _ext

        on_cpu = x.device.type == "cpu" and _ext.available()
        if on_cpu or (x.device.type == "cuda" and _ext.cuda_available()):
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
    supports_out = True

    def save(self, module, args, kwargs, output, ctx):
        return (args[0], ctx)

    def grad_rows_multi(self, module, saved, gouts, name, r0, r1):
        # Several logits' output gradients of one ungrouped convolution: stacked as
        # K*C_out output channels they share one patch matrix, and every sample's
        # gradients for all K logits come from one (K*C_out x T) @ (T x C_in*k) product.
        # NB201 "trace" at N=32 on the 2-core CPU, medians of 5 alternating runs: 1.37 s
        # all logits at once vs 1.33 s logit by logit, within the machine's noise (python
        # bench/bench_engine_choices.py trace; bench/results/engine_choices_cpu.md).
        if name != "weight" or module.groups != 1 or len(gouts) == 1:
            return super().grad_rows_multi(module, saved, gouts, name, r0, r1)
        x, ctx = saved
        K, nd = len(gouts), len(module.kernel_size)
        ghost = self._ghost(module, ctx, x, gouts[0][:, r0:r1])
        if ghost is not None:  # one patch matrix, shared by the K blocks
            u, n, T = ghost
            return [Outer(gk[:, r0:r1].reshape(n, r1 - r0, T).transpose(1, 2), u) for gk in gouts]
        if ctx.backend in ("triton", "csrc"):  # the compiled kernels take the stacked gradients
            c = K * (r1 - r0)  # (rows r0:r1 only: each row range computes its own channels)
            G = self.grad_rows(module, saved, torch.cat([gk[:, r0:r1] for gk in gouts], 1),
                               name, 0, c).G  # fmt: skip
            G = G.reshape(G.shape[0], c, -1)
            r0, r1 = 0, r1 - r0
        else:
            if x.dim() == nd + 1:
                x, gouts = x.unsqueeze(0), [g.unsqueeze(0) for g in gouts]
            g = torch.cat([gk[:, r0:r1] for gk in gouts], 1)  # (n, K*rows, ...)
            G = _weight_grad(module, ctx, x, g, 1)  # (n, K*rows, C_in*k)
            r0, r1 = 0, r1 - r0
        n, c_out = G.shape[0], G.shape[1] // K
        G = G.reshape(n, K, c_out, -1)[:, :, r0:r1]
        return [Dense(G[:, k].reshape(n, -1)) for k in range(K)]

    def grad_rows(self, module, saved, gout, name, r0, r1, out=None):
        x, ctx = saved
        nd = len(module.kernel_size)
        if gout.dim() == nd + 1:
            gout = gout.unsqueeze(0)
        n, c_out = gout.shape[:2]
        g = gout.reshape(n, c_out, -1)  # (n, C_out, T)
        if name == "bias":
            return Dense(g[:, r0:r1].sum(2))
        if x.dim() == nd + 1:
            x = x.unsqueeze(0)
        T = g.shape[-1]
        groups = module.groups
        og = c_out // groups
        # Only what rows r0:r1 need (a big layer is cut into row ranges: the whole layer
        # once per range would be ranges x the work), for every strategy:
        if groups == 1:  # rows r0:r1 are output channels r0:r1: only their gradients
            h0, h1, xs, gs = 0, 1, x, gout[:, r0:r1]
            lo, hi = 0, r1 - r0
        else:  # the groups that rows r0:r1 touch, sliced afterwards
            h0, h1 = r0 // og, -(-r1 // og)
            cin_g = x.shape[1] // groups
            xs, gs = x[:, h0 * cin_g : h1 * cin_g], gout[:, h0 * og : h1 * og]
            lo, hi = r0 - h0 * og, r1 - h0 * og
        if groups == 1:
            ghost = self._ghost(module, ctx, x, gs)
            if ghost is not None:
                u, n, T = ghost
                return Outer(gs.reshape(n, r1 - r0, T).transpose(1, 2), u)
        compiled = _compiled_weight_grad(module, xs, gs, ctx.backend, T, groups=h1 - h0)
        if compiled is not None:
            return Dense(compiled.reshape(n, gs.shape[1], -1)[:, lo:hi].reshape(n, -1))
        if (lo, hi) != (0, gs.shape[1]):
            out = None  # the result is sliced: not written into ``out``
        G = _weight_grad(module, ctx, xs, gs, h1 - h0, out)
        return Dense(G[:, lo:hi].reshape(n, -1))

    @staticmethod
    def _ghost(module, ctx, x, gs):
        """(patches (n, T, C_in * prod(k)), n, T) where an :class:`Outer` block with
        positions pays for output gradients ``gs`` (n, rows, *out_spatial) of an ungrouped
        convolution on the PyTorch backends, else None."""
        if ctx.backend not in ("torch", "auto"):
            return None
        nd = len(module.kernel_size)
        if x.dim() == nd + 1:
            x, gs = x.unsqueeze(0), gs.unsqueeze(0)
        n, rows, T = gs.shape[0], gs.shape[1], gs[0, 0].numel()
        D = x.shape[1] * _prod(module.kernel_size)
        if not outer_pays(n, T, rows, D):
            return None
        return unfold_patches(module, x).transpose(1, 2), n, T
