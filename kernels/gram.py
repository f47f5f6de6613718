"""Gram accumulation ``out += a bᵀ`` (the NTK's per-layer update Θ += G Gᵀ).

Layout of this file: the pure-PyTorch reference :func:`gram_reference`, the
``@triton.jit`` kernel :func:`_gram_kernel`, and the launcher :func:`gram`.

Symmetric case (``b is None``): only the output tiles with ``tile_j >= tile_i``
are computed; each off-diagonal tile is stored twice (as itself and, through
transposed pointers, as its mirror), so about half the FLOPs of ``a @ a.T``.
Every output element is owned by exactly one program, so accumulation into
``out`` needs no atomics.

Precision modes (the operands; accumulation is always float32):

- ``"ieee"``: float32 operands, exact float32 FMA (``tl.dot(..., input_precision="ieee")``).
- ``"tf32"``: float32 operands rounded to TF32 on tensor cores (10-bit mantissa).
- ``"bf16"``: operands cast to bfloat16 (8-bit mantissa), float32 accumulation. (In the
  interpreter the bf16-rounded operands are multiplied in float32: same values.)

On Triton's CPU interpreter (``TRITON_INTERPRET=1``) tf32/bf16 only exercise the
code path (the interpreter multiplies in numpy); their error has to be measured
on a GPU, against the error of ``torch.mm`` in the same dtype (the accuracy bar for a
reduced-precision mode: at most 2x PyTorch's own error; ``bench/gpu_check.py`` part 2
measures each mode's error against a float64 Gram).

Triton compatibility: uses only ``tl.dot(acc=..., input_precision=...)``,
``tl.load``/``tl.store`` with masks and ``tl.cdiv``, all present in Triton 3.6.
"""

from __future__ import annotations

import torch

from . import TRITON_AVAILABLE, interpreter_enabled, why_not

_PRECISIONS = {"ieee": 0, "tf32": 1, "bf16": 2}
_OPERAND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- reference
def gram_reference(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch Gram matrix ``a bᵀ`` accumulated in float32 (float64 for float64 input).

    Args:
        a: (N1, P) rows are samples.
        b: (N2, P) or ``None`` for the symmetric ``a aᵀ``.

    Returns:
        (N1, N2) tensor, float32 (float64 when ``a`` is float64).
    """
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a32 = a.to(dtype)
    b32 = a32 if b is None else b.to(dtype)
    return a32 @ b32.T


# --------------------------------------------------------------------------- kernel
if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _gram_kernel(
        a_ptr,
        b_ptr,
        out_ptr,
        pair_i_ptr,
        pair_j_ptr,
        N1,
        N2,
        P,
        stride_am,
        stride_ak,
        stride_bm,
        stride_bk,
        stride_om,
        stride_on,
        SYMMETRIC: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        PRECISION: tl.constexpr,
        BF16_EMULATE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One (BLOCK_M, BLOCK_N) output tile; in the symmetric case also its mirror."""
        pid = tl.program_id(0)
        if SYMMETRIC:
            # 1-D grid over the upper-triangle tile pairs (tile_j >= tile_i).
            ti = tl.load(pair_i_ptr + pid)
            tj = tl.load(pair_j_ptr + pid)
        else:
            num_tj = tl.cdiv(N2, BLOCK_N)
            ti = pid // num_tj
            tj = pid % num_tj
        offs_m = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tj * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < N1
        mask_n = offs_n < N2
        # a tile (BLOCK_M, BLOCK_K); b tile loaded already transposed, (BLOCK_K, BLOCK_N).
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_n[None, :] * stride_bm + offs_k[:, None] * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, P, BLOCK_K):
            mask_k = (k0 + offs_k) < P
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if PRECISION == 2:
                if BF16_EMULATE:
                    # Interpreter: numpy has no bfloat16 matmul (Triton 3.9's interpreter
                    # returns garbage for a bf16 tl.dot), so round the operands to bf16 and
                    # multiply in float32: the same numbers, as bf16 x bf16 products are
                    # exact in float32.
                    acc = tl.dot(
                        a.to(tl.bfloat16).to(tl.float32),
                        b.to(tl.bfloat16).to(tl.float32),
                        acc,
                        input_precision="ieee",
                    )
                else:
                    acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
            elif PRECISION == 1:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
            else:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if SYMMETRIC:
            if ti == tj:
                # A diagonal tile's (m, n) and (n, m) sums may round differently (summation
                # order of the dot): average them so that the result is exactly symmetric.
                acc = (acc + tl.trans(acc)) * 0.5
        mask_out = mask_m[:, None] & mask_n[None, :]
        o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        if ACCUMULATE:
            res = acc + tl.load(o_ptrs, mask=mask_out, other=0.0)
        else:
            res = acc
        tl.store(o_ptrs, res, mask=mask_out)
        if SYMMETRIC:
            if ti != tj:
                # Mirror: element (m, n) of this tile goes to out[n, m].
                t_ptrs = out_ptr + offs_n[None, :] * stride_om + offs_m[:, None] * stride_on
                if ACCUMULATE:
                    res_t = acc + tl.load(t_ptrs, mask=mask_out, other=0.0)
                else:
                    res_t = acc
                tl.store(t_ptrs, res_t, mask=mask_out)


# --------------------------------------------------------------------------- launcher
_PAIR_CACHE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _upper_pairs(num_tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column tile indices of the upper triangle (tile_j >= tile_i), cached per device."""
    key = (num_tiles, str(device))
    if key not in _PAIR_CACHE:
        ii, jj = torch.triu_indices(num_tiles, num_tiles)
        _PAIR_CACHE[key] = (ii.to(torch.int32).to(device), jj.to(torch.int32).to(device))
    return _PAIR_CACHE[key]


def _config(device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)."""
    if device.type == "cpu":  # interpreter: few, large numpy ops
        return 32, 32, 64, 1
    return 64, 64, 32, 4  # an untuned GPU default: no GPU measurement chose it


def gram(
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    precision: str = "ieee",
) -> torch.Tensor:
    """Gram matrix ``a bᵀ`` (or ``a aᵀ``) with float32 accumulation, optionally ``out += ...``.

    Args:
        a: (N1, P) float32 / float16 / bfloat16, any strides.
        b: (N2, P) same dtype family, or ``None`` for the symmetric ``a aᵀ`` (upper tiles
            only, mirrored).
        out: optional (N1, N2) float32 tensor (any strides, no overlapping elements) that is
            accumulated into (``out += a bᵀ``) and returned; a new tensor otherwise.
        precision: ``"ieee"``, ``"tf32"`` or ``"bf16"`` operand mode.

    Returns:
        (N1, N2) float32 tensor (``out`` when given).

    Float64 input is not a Triton path: it is computed with ``torch`` in float64 (and
    accumulated into ``out`` of any floating dtype) so the fp64 option keeps its accuracy.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D (N1, P), got shape {tuple(a.shape)}")
    if b is not None:
        if b.dim() != 2:
            raise ValueError(f"b must be 2-D (N2, P), got shape {tuple(b.shape)}")
        if b.shape[1] != a.shape[1]:
            raise ValueError(f"a and b need the same width P, got {a.shape[1]} and {b.shape[1]}")
        if b.device != a.device:
            raise ValueError(f"a and b are on different devices ({a.device}, {b.device})")
    n1, p = a.shape
    n2 = n1 if b is None else b.shape[0]
    if out is not None:
        if tuple(out.shape) != (n1, n2):
            raise ValueError(f"out must have shape {(n1, n2)}, got {tuple(out.shape)}")
        if out.device != a.device:
            raise ValueError(f"out is on {out.device}, a on {a.device}")

    if a.dtype == torch.float64 or (b is not None and b.dtype == torch.float64):
        res = gram_reference(a.double(), None if b is None else b.double())
        if out is None:
            return res
        out += res.to(out.dtype)
        return out

    for name, t in (("a", a), ("b", b)):
        if t is not None and t.dtype not in _OPERAND_DTYPES:
            raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if out is not None and out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    reason = why_not(a.device)
    if reason is not None:
        raise RuntimeError(f"the Triton Gram kernel cannot run: {reason}")

    accumulate = out is not None
    if out is None:
        out = torch.empty((n1, n2), dtype=torch.float32, device=a.device)
    if n1 == 0 or n2 == 0:
        return out
    if p == 0:
        if not accumulate:
            out.zero_()
        return out

    block_m, block_n, block_k, num_warps = _config(a.device)
    symmetric = b is None
    bb = a if symmetric else b
    if symmetric:
        block_n = block_m
        num_tiles = triton.cdiv(n1, block_m)
        pair_i, pair_j = _upper_pairs(num_tiles, a.device)
        grid = (pair_i.numel(),)
    else:
        pair_i = pair_j = out  # unused placeholders (a pointer argument is still needed)
        grid = (triton.cdiv(n1, block_m) * triton.cdiv(n2, block_n),)
    _gram_kernel[grid](
        a,
        bb,
        out,
        pair_i,
        pair_j,
        n1,
        n2,
        p,
        a.stride(0),
        a.stride(1),
        bb.stride(0),
        bb.stride(1),
        out.stride(0),
        out.stride(1),
        SYMMETRIC=symmetric,
        ACCUMULATE=accumulate,
        PRECISION=_PRECISIONS[precision],
        BF16_EMULATE=interpreter_enabled(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out


__all__ = ["gram", "gram_reference", "interpreter_enabled"]
