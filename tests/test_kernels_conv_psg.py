"""Triton per-sample conv/linear weight gradients (kernels/conv_psg.py), CPU interpreter.

Ground truth: float64 torch.func — per-sample gradient w.r.t. the weight of
Σ conv(x_i, w) ⊙ gout_i, i.e. vmap(grad) over samples.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from fastntk.kernels import why_not  # noqa: E402
from fastntk.kernels.conv_psg import (  # noqa: E402
    conv2d_psg,
    conv2d_psg_reference,
    linear_psg,
    linear_psg_reference,
)

pytestmark = pytest.mark.skipif(why_not("cpu") is not None, reason=str(why_not("cpu")))

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups)
CASES = {
    "3x3_pad1": (2, 3, 16, 8, 8, 3, 1, 1, 1, 1),
    "n1_k5_s2_p2_d2": (1, 5, 7, 9, 7, 5, 2, 2, 2, 1),
    "depthwise_dil2": (2, 8, 8, 8, 8, 3, 1, 2, 2, 8),
    "depthwise_mult2": (2, 4, 8, 6, 6, 3, 1, 1, 1, 4),
    "groups3_stride2": (2, 6, 12, 7, 9, 3, 2, 1, 1, 3),
    "1x1": (2, 16, 32, 8, 8, 1, 1, 0, 1, 1),
    "rect_kernel": (2, 4, 8, 5, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2),
    "wide_97": (1, 97, 16, 4, 4, 3, 1, 1, 1, 1),
}


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _ground_truth(x, gout, w, stride, padding, dilation, groups):
    """float64 per-sample d/dw of Σ conv(x_i, w) ⊙ gout_i via torch.func."""
    from torch.func import grad, vmap

    def f(weight, xi, gi):
        y = F.conv2d(
            xi[None], weight, stride=stride, padding=padding, dilation=dilation, groups=groups
        )
        return (y[0] * gi).sum()

    return vmap(grad(f), in_dims=(None, 0, 0))(w.double(), x.double(), gout.double())


def _make(case, seed=0):
    n, ci, co, h, w, k, s, p, d, g = case
    torch.manual_seed(seed)
    kh, kw = _pair(k)
    x = torch.randn(n, ci, h, w)
    wt = torch.randn(co, ci // g, kh, kw)
    y = F.conv2d(x, wt, stride=s, padding=p, dilation=d, groups=g)
    gout = torch.randn_like(y)
    return x, gout, wt, dict(stride=s, padding=p, dilation=d, groups=g)


@pytest.mark.parametrize("name", list(CASES))
def test_conv_psg_matches_reference_and_fp64(name):
    x, gout, wt, hp = _make(CASES[name])
    res = conv2d_psg(x, gout, kernel_size=wt.shape[2:], **hp)
    assert res.shape == (x.shape[0], *wt.shape) and res.dtype == torch.float32
    ref = conv2d_psg_reference(
        x, gout, wt.shape, hp["stride"], hp["padding"], hp["dilation"], hp["groups"]
    )
    torch.testing.assert_close(res, ref, rtol=1e-5, atol=1e-4)
    truth = _ground_truth(x, gout, wt, **hp)
    torch.testing.assert_close(res.double(), truth, rtol=1e-5, atol=1e-4)


def test_conv_psg_non_contiguous_and_out_view():
    x, gout, wt, hp = _make(CASES["groups3_stride2"], seed=1)
    x_nc = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides
    g_nc = torch.randn(gout.shape[::-1]).permute(3, 2, 1, 0)  # fully transposed strides
    g_nc.copy_(gout)
    n, cols = x.shape[0], wt.numel()
    big = torch.full((n, cols + 9), 5.0)
    out = big[:, 4 : 4 + cols]  # column block of a wider matrix: row stride != cols
    ret = conv2d_psg(x_nc, g_nc, kernel_size=3, out=out, **hp)
    assert ret.data_ptr() == out.data_ptr()
    truth = _ground_truth(x, gout, wt, **hp).reshape(n, cols).float()
    torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-4)
    assert torch.all(big[:, :4] == 5.0) and torch.all(big[:, 4 + cols :] == 5.0)
    conv2d_psg(x, gout, kernel_size=3, out=out, accumulate=True, **hp)  # tied weights
    torch.testing.assert_close(out, 2 * truth, rtol=1e-5, atol=2e-4)


def test_conv_psg_float64_and_bad_inputs():
    x, gout, wt, hp = _make(CASES["3x3_pad1"], seed=2)
    res = conv2d_psg(x.double(), gout.double(), kernel_size=3, **hp)
    assert res.dtype == torch.float64
    # (exact here; assert_close's float64 default, 1e-7, passes a float32 round trip)
    torch.testing.assert_close(res, _ground_truth(x, gout, wt, **hp), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError):  # wrong output size
        conv2d_psg(x, gout, kernel_size=3, padding=0)
    with pytest.raises(ValueError):  # groups do not divide
        conv2d_psg(x, gout, kernel_size=3, padding=1, groups=2)
    with pytest.raises(ValueError):
        conv2d_psg(x[0], gout, kernel_size=3, padding=1)
    with pytest.raises(ValueError):
        conv2d_psg(x, gout, kernel_size=3, padding=1, out=torch.zeros(2, 5))
    with pytest.raises(TypeError):
        conv2d_psg(x.int(), gout, kernel_size=3, padding=1)


@pytest.mark.parametrize("n,t,d,p", [(1, 1, 5, 3), (3, 17, 40, 24), (2, 33, 97, 16)])
def test_linear_psg(n, t, d, p):
    torch.manual_seed(n + t)
    u, g = torch.randn(n, t, d), torch.randn(n, t, p)
    res = linear_psg(u, g)
    assert res.shape == (n, p, d)
    truth = torch.einsum("ntp,ntd->npd", g.double(), u.double())
    torch.testing.assert_close(res.double(), truth, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(res, linear_psg_reference(u, g), rtol=1e-5, atol=1e-4)


def test_linear_psg_strided_out_and_inputs():
    torch.manual_seed(5)
    u = torch.randn(3, 40, 11).transpose(1, 2)  # (3, 11, 40) non-contiguous
    g = torch.randn(3, 11, 16)
    big = torch.zeros(3, 16 * 40 + 3)
    out = big[:, 3:]
    linear_psg(u, g, out=out)
    torch.testing.assert_close(
        out.view(3, 16, 40), linear_psg_reference(u, g), rtol=1e-5, atol=1e-4
    )
    with pytest.raises(ValueError):
        linear_psg(u, g[:, :5])
