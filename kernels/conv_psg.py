"""Per-sample weight gradients of Conv2d and of token-wise Linear layers, implicit im2col.

Reached through ``fastntk.ntk(..., method="triton")``: :func:`conv2d_psg` by the Conv2d
rule (``fastntk/rules/conv.py``), :func:`linear_psg` by the Linear rule on (N, T, d)
token inputs (``fastntk/rules/linear.py``).

Identity (the layerwise per-sample gradient): for sample i, output position t, input patch u_{i,t}
(width D = C_in/groups · kh · kw) and output gradient g_{i,t} (width C_out/groups),
per group γ

    G_{i,γ} = Σ_t g_{i,γ,t} u_{i,γ,t}ᵀ        (C_out/groups × D)

and the per-sample conv weight gradient is the stack of the G_{i,γ} over γ, i.e.
a (C_out, C_in/groups, kh, kw) tensor per sample. The kernel never materialises
the unfold buffer (N · C_in·kh·kw · T floats): each program gathers its
(BLOCK_T, BLOCK_D) patch tile straight from ``x`` with masks for the zero padding,
so only the diagonal group blocks are computed (no groups² waste for depthwise).

Layout of this file: references (:func:`conv2d_psg_reference`,
:func:`linear_psg_reference`), the ``@triton.jit`` kernel :func:`_psg_kernel`, and
the launchers :func:`conv2d_psg` and :func:`linear_psg` (the token version maps
u (N, T, d) onto a 1×1 "convolution" over T positions through strides, same kernel).

Triton compatibility: ``tl.dot(acc=..., input_precision="ieee")``, masked loads,
``tl.sum``; nothing newer than Triton 3.6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import TRITON_AVAILABLE, why_not

_OPERAND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pair(v: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(e) for e in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


# --------------------------------------------------------------------------- references
def conv2d_psg_reference(
    x: torch.Tensor,
    gout: torch.Tensor,
    weight_shape: tuple[int, int, int, int] | torch.Size,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Per-sample Conv2d weight gradient via unfold + batched matmul (pure PyTorch).

    Args:
        x: (N, C_in, H, W) layer input.
        gout: (N, C_out, oH, oW) gradient w.r.t. the layer output.
        weight_shape: (C_out, C_in // groups, kh, kw).

    Returns:
        (N, C_out, C_in // groups, kh, kw), dtype of ``x``.
    """
    c_out, cin_g, kh, kw = (int(s) for s in weight_shape)
    n = x.shape[0]
    u = F.unfold(
        x,
        (kh, kw),
        dilation=_pair(dilation, "dilation"),
        padding=_pair(padding, "padding"),
        stride=_pair(stride, "stride"),
    )
    t = u.shape[-1]
    u = u.reshape(n, groups, cin_g * kh * kw, t)
    g = gout.reshape(n, groups, c_out // groups, t).to(u.dtype)
    res = torch.matmul(g, u.transpose(-1, -2))  # (N, groups, C_out/groups, D)
    return res.reshape(n, c_out, cin_g, kh, kw)


def linear_psg_reference(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradient of a token-wise Linear layer: G_i = g_iᵀ u_i.

    Args:
        u: (N, T, d) layer input.  g: (N, T, p) output gradient.

    Returns:
        (N, p, d).
    """
    return torch.matmul(g.transpose(1, 2), u.to(g.dtype) if g.dtype != u.dtype else u)


# --------------------------------------------------------------------------- kernel
if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _psg_kernel(
        x_ptr,
        g_ptr,
        out_ptr,
        C_in_g,
        H,
        W,
        C_out_g,
        oW,
        D,
        T,
        GROUPS,
        stride_xn,
        stride_xc,
        stride_xh,
        stride_xw,
        stride_gn,
        stride_gc,
        stride_gh,
        stride_gw,
        stride_on,
        stride_oc,
        KH,
        KW,
        SH,
        SW,
        PH,
        PW,
        DH,
        DW,
        ACCUMULATE: tl.constexpr,
        USE_DOT: tl.constexpr,
        BLOCK_CO: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """One (BLOCK_CO, BLOCK_D) tile of G_{n,γ}; grid = (N·groups, co tiles, d tiles)."""
        pid_ng = tl.program_id(0)
        pid_co = tl.program_id(1)
        pid_d = tl.program_id(2)
        n = pid_ng // GROUPS
        grp = pid_ng % GROUPS
        offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)  # local output channel
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (ci, ky, kx) flattened
        mask_co = offs_co < C_out_g
        mask_d = offs_d < D
        khw = KH * KW
        ci = offs_d // khw
        r = offs_d % khw
        ky = r // KW
        kx = r % KW
        # int64 sample offsets: N·C·H·W can pass 2**31 at ViT/NB201 batch sizes.
        x_base = x_ptr + n.to(tl.int64) * stride_xn + (grp * C_in_g + ci) * stride_xc
        g_base = g_ptr + n.to(tl.int64) * stride_gn + (grp * C_out_g + offs_co) * stride_gc
        dy = ky * DH - PH
        dx = kx * DW - PW
        acc = tl.zeros((BLOCK_CO, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < T
            oy = offs_t // oW
            ox = offs_t % oW
            g = tl.load(
                g_base[:, None] + oy[None, :] * stride_gh + ox[None, :] * stride_gw,
                mask=mask_co[:, None] & mask_t[None, :],
                other=0.0,
            ).to(tl.float32)
            iy = oy[:, None] * SH + dy[None, :]
            ix = ox[:, None] * SW + dx[None, :]
            inside = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            u = tl.load(
                x_base[None, :] + iy * stride_xh + ix * stride_xw,
                mask=mask_t[:, None] & mask_d[None, :] & inside,
                other=0.0,
            ).to(tl.float32)
            if USE_DOT:
                acc = tl.dot(g, u, acc, input_precision="ieee")
            else:  # tiny tiles (depthwise, C_out/groups < 8): broadcast-multiply-reduce
                acc += tl.sum(g[:, :, None] * u[None, :, :], axis=1)
        o_ptrs = (
            out_ptr
            + n.to(tl.int64) * stride_on
            + ((grp * C_out_g + offs_co)[:, None] * D + offs_d[None, :]) * stride_oc
        )
        mask_o = mask_co[:, None] & mask_d[None, :]
        if ACCUMULATE:
            acc += tl.load(o_ptrs, mask=mask_o, other=0.0)
        tl.store(o_ptrs, acc, mask=mask_o)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def tiles(c_out_g: int, d: int, *, on_gpu: bool) -> dict[str, int | bool]:
    """The constexpr tile shape and ``num_warps`` of :func:`_psg_kernel` for ``C_out/groups``
    output channels and ``D = C_in/groups · kh · kw`` taps (the interpreter gets larger T
    slices: fewer, bigger numpy operations)."""
    use_dot = c_out_g >= 8 and d >= 8
    if use_dot:  # tl.dot needs every tile dimension >= 16
        block_co = min(max(_next_pow2(c_out_g), 16), 64)
        block_d = min(max(_next_pow2(d), 16), 64)
        block_t = 32 if on_gpu else 64
    else:  # tiny tiles (depthwise, C_out/groups < 8): broadcast-multiply-reduce
        block_co = max(_next_pow2(c_out_g), 2)
        block_d = min(max(_next_pow2(d), 2), 32)
        block_t = 32
    return dict(
        USE_DOT=use_dot,
        BLOCK_CO=block_co,
        BLOCK_D=block_d,
        BLOCK_T=block_t,
        num_warps=4 if on_gpu else 1,
    )


def _launch(
    x: torch.Tensor,
    x_strides: tuple[int, int, int, int],
    c_in_g: int,
    h: int,
    w: int,
    gout: torch.Tensor,
    g_strides: tuple[int, int, int, int],
    c_out_g: int,
    ow: int,
    t: int,
    n: int,
    groups: int,
    geom: tuple[int, ...],
    out2d: torch.Tensor,
    accumulate: bool,
) -> None:
    """Pick tiles and launch :func:`_psg_kernel` writing into ``out2d`` (N, C_out·D)."""
    kh, kw = geom[0], geom[1]
    d = c_in_g * kh * kw
    cfg = tiles(c_out_g, d, on_gpu=x.device.type != "cpu")
    grid = (n * groups, triton.cdiv(c_out_g, cfg["BLOCK_CO"]), triton.cdiv(d, cfg["BLOCK_D"]))
    _psg_kernel[grid](
        x,
        gout,
        out2d,
        c_in_g,
        h,
        w,
        c_out_g,
        ow,
        d,
        t,
        groups,
        *x_strides,
        *g_strides,
        out2d.stride(0),
        out2d.stride(1),
        *geom,
        ACCUMULATE=accumulate,
        **cfg,
    )


def _check_out(out: torch.Tensor, n: int, cols: int, device: torch.device) -> None:
    if out.dim() != 2 or tuple(out.shape) != (n, cols):
        raise ValueError(f"out must be an (N, C_out*D) = {(n, cols)} view, got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, inputs on {device}")


# --------------------------------------------------------------------------- launchers
def conv2d_psg(
    x: torch.Tensor,
    gout: torch.Tensor,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Per-sample Conv2d weight gradients without an unfold buffer.

    Args:
        x: (N, C_in, H, W) unpadded layer input, any strides; float32/float16/bfloat16
            (float64 is computed by the PyTorch reference in float64).
        gout: (N, C_out, oH, oW) output gradient, any strides.
        kernel_size, stride, padding, dilation: ints or pairs, as in ``nn.Conv2d``
            (``padding`` is the zero padding applied to ``x``; padding modes other than zeros
            must be applied to ``x`` beforehand, with ``padding=0``).
        groups: as in ``nn.Conv2d``; only the diagonal group blocks are computed.
        out: optional (N, C_out · C_in/groups · kh · kw) float32 view (e.g. a column block
            of a larger matrix; any row and column strides) that receives the result.
        accumulate: add into ``out`` instead of overwriting it (tied weights).

    Returns:
        (N, C_out, C_in // groups, kh, kw) float32 (float64 for float64 input), or ``out``.
    """
    if x.dim() != 4 or gout.dim() != 4:
        raise ValueError(f"x and gout must be 4-D, got {tuple(x.shape)} and {tuple(gout.shape)}")
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("kernel_size, stride, dilation must be >= 1 and padding >= 0")
    n, c_in, h, w = x.shape
    n2, c_out, oh, ow = gout.shape
    if n2 != n:
        raise ValueError(f"x and gout have different batch sizes ({n}, {n2})")
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide C_in={c_in} and C_out={c_out}")
    exp_oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    exp_ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (oh, ow) != (exp_oh, exp_ow):
        raise ValueError(
            f"gout spatial size {(oh, ow)} does not match the conv output "
            f"{(exp_oh, exp_ow)} of x {(h, w)} with these hyper-parameters"
        )
    if x.device != gout.device:
        raise ValueError(f"x and gout are on different devices ({x.device}, {gout.device})")
    cin_g, cout_g = c_in // groups, c_out // groups
    cols = c_out * cin_g * kh * kw
    if out is not None:
        _check_out(out, n, cols, x.device)

    if x.dtype == torch.float64 or gout.dtype == torch.float64:
        res = conv2d_psg_reference(
            x.double(), gout.double(), (c_out, cin_g, kh, kw), (sh, sw), (ph, pw), (dh, dw), groups
        )
        if out is None:
            return res
        if accumulate:
            out += res.reshape(n, cols).to(out.dtype)
        else:
            out.copy_(res.reshape(n, cols))
        return out
    if x.dtype not in _OPERAND_DTYPES or gout.dtype not in _OPERAND_DTYPES:
        raise TypeError(f"x and gout must be floating point, got {x.dtype} and {gout.dtype}")
    if out is not None and out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    reason = why_not(x.device)
    if reason is not None:
        raise RuntimeError(f"the Triton conv psg kernel cannot run: {reason}")

    result = None
    if out is None:
        result = torch.zeros((n, c_out, cin_g, kh, kw), dtype=torch.float32, device=x.device)
        out = result.view(n, cols)
        accumulate = False
    if n == 0 or cols == 0:
        return out if result is None else result
    _launch(
        x,
        tuple(x.stride()),
        cin_g,
        h,
        w,
        gout,
        tuple(gout.stride()),
        cout_g,
        ow,
        oh * ow,
        n,
        groups,
        (kh, kw, sh, sw, ph, pw, dh, dw),
        out,
        accumulate,
    )
    return out if result is None else result


def linear_psg(
    u: torch.Tensor,
    g: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Per-sample weight gradient of a token-wise Linear layer, G_i = g_iᵀ u_i, fused.

    Args:
        u: (N, T, d) layer input, any strides.
        g: (N, T, p) output gradient, any strides.
        out: optional (N, p · d) float32 view receiving the result (any strides).
        accumulate: add into ``out`` instead of overwriting it.

    Returns:
        (N, p, d) float32 (float64 for float64 input), or ``out``.
    """
    if u.dim() != 3 or g.dim() != 3:
        raise ValueError(f"u and g must be 3-D, got {tuple(u.shape)} and {tuple(g.shape)}")
    n, t, d = u.shape
    if g.shape[0] != n or g.shape[1] != t:
        raise ValueError(f"u {tuple(u.shape)} and g {tuple(g.shape)} disagree on (N, T)")
    if u.device != g.device:
        raise ValueError(f"u and g are on different devices ({u.device}, {g.device})")
    p = g.shape[2]
    if out is not None:
        _check_out(out, n, p * d, u.device)
    if u.dtype == torch.float64 or g.dtype == torch.float64:
        res = linear_psg_reference(u.double(), g.double())
        if out is None:
            return res
        if accumulate:
            out += res.reshape(n, p * d).to(out.dtype)
        else:
            out.copy_(res.reshape(n, p * d))
        return out
    if u.dtype not in _OPERAND_DTYPES or g.dtype not in _OPERAND_DTYPES:
        raise TypeError(f"u and g must be floating point, got {u.dtype} and {g.dtype}")
    if out is not None and out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    reason = why_not(u.device)
    if reason is not None:
        raise RuntimeError(f"the Triton linear psg kernel cannot run: {reason}")
    result = None
    if out is None:
        result = torch.zeros((n, p, d), dtype=torch.float32, device=u.device)
        out = result.view(n, p * d)
        accumulate = False
    if n == 0 or p * d == 0:
        return out if result is None else result
    # u as x (N, C_in=d, H=T, W=1), g as gout (N, C_out=p, oH=T, oW=1): a 1x1 conv over T.
    su, sg = u.stride(), g.stride()
    _launch(
        u,
        (su[0], su[2], su[1], 0),
        d,
        t,
        1,
        g,
        (sg[0], sg[2], sg[1], 0),
        p,
        1,
        t,
        n,
        1,
        (1, 1, 1, 1, 0, 0, 1, 1),
        out,
        accumulate,
    )
    return out if result is None else result


__all__ = ["conv2d_psg", "conv2d_psg_reference", "linear_psg", "linear_psg_reference"]
