"""C++ ops of fastntk._C (torch.ops.fastntk.*) against the PyTorch paths, float32 and float64."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fastntk import _ext
from fastntk.errors import UnsupportedError

pytestmark = pytest.mark.skipif(
    not _ext.available(), reason=f"fastntk._C is not built: {_ext.why_not()}"
)

ops = torch.ops.fastntk


def _ref_psg(x, gout, wshape, stride, padding, dilation, groups):
    c_out, cin_g, kh, kw = wshape
    u = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    n, t = x.shape[0], u.shape[-1]
    u = u.reshape(n, groups, cin_g * kh * kw, t)
    g = gout.reshape(n, groups, c_out // groups, t)
    return (g @ u.transpose(-1, -2)).reshape(n, c_out, cin_g, kh, kw)


def _pair(v):
    return (v, v) if isinstance(v, int) else v


TOL = {torch.float32: dict(rtol=1e-5, atol=2e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}

HAS_AVX512 = "avx512f" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False


@pytest.fixture(params=["avx512", "avx2"])
def vector_path(request, monkeypatch):
    """The Gram op's two CPU tile kernels: AVX-512 6x4 blocks where the CPU has AVX-512F,
    and the AVX2 4x3 blocks (FASTNTK_NO_AVX512=1, read by the op at each call)."""
    if request.param == "avx512" and not HAS_AVX512:
        pytest.skip("this CPU has no AVX-512F: the op runs the AVX2 tiles only")
    monkeypatch.setenv("FASTNTK_NO_AVX512", "1" if request.param == "avx2" else "0")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,p", [(1, 97), (5, 1023), (97, 97), (97, 1023), (130, 33), (7, 1)])
def test_gram_sym(n, p, dtype, vector_path):
    torch.manual_seed(n + p)
    a = torch.randn(n, p, dtype=dtype)
    out = torch.full((n, n), 0.5, dtype=dtype)
    ops.gram_sym(a, out, False)
    truth = a.double() @ a.double().T + 0.5
    torch.testing.assert_close(out.double(), truth, **TOL[dtype])
    assert torch.equal(out, out.T)  # mirrored, exactly symmetric


@pytest.mark.parametrize("n,p", [(5, 1023), (97, 1023)])
def test_gram_sym_fp64_accumulation(n, p, vector_path):
    torch.manual_seed(0)
    a = torch.randn(n, p) + 3.0  # large common mean: float32 accumulation loses digits
    truth = a.double() @ a.double().T
    out64 = torch.zeros(n, n, dtype=torch.float64)
    ops.gram_sym(a, out64, False)  # float64 out: float64 accumulator
    assert (out64 - truth).abs().max() < 1e-9 * truth.abs().max()
    out32 = torch.zeros(n, n)
    ops.gram_sym(a, out32, True)  # float32 out, float64 accumulator: one final rounding
    torch.testing.assert_close(out32, truth.float(), rtol=2e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n1,n2,p", [(1, 5, 97), (97, 5, 1023), (33, 130, 40)])
def test_gram_cross(n1, n2, p, dtype, vector_path):
    torch.manual_seed(n1 * n2)
    a, b = torch.randn(n1, p, dtype=dtype), torch.randn(n2, p, dtype=dtype)
    out = torch.ones(n1, n2, dtype=dtype)
    ops.gram_cross(a, b, out)
    torch.testing.assert_close(out.double(), a.double() @ b.double().T + 1, **TOL[dtype])


def test_gram_row_strided_views():
    torch.manual_seed(1)
    big = torch.randn(40, 300)
    a = big[:, 10:110]  # row stride 300, rows contiguous: accepted as is
    big_out = torch.zeros(50, 60)
    out = big_out[5:45, 3:43]
    ops.gram_sym(a, out, False)
    torch.testing.assert_close(out, a @ a.T, rtol=1e-5, atol=1e-4)
    assert big_out[:5].abs().sum() == 0 and big_out[:, :3].abs().sum() == 0
    # the Python wrapper makes column-strided inputs contiguous
    at = torch.randn(60, 40).T
    res = _ext.gram_sym(at, torch.zeros(40, 40))
    torch.testing.assert_close(res, at @ at.T, rtol=1e-5, atol=1e-4)
    res = _ext.gram_cross(at, torch.randn(30, 60)[:, ::1], torch.zeros(40, 30))
    assert res.shape == (40, 30)


def test_gram_bad_inputs():
    a = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="2-D"):
        ops.gram_sym(torch.randn(4, 6, 1), torch.zeros(4, 4), False)
    with pytest.raises(RuntimeError, match="shape"):
        ops.gram_sym(a, torch.zeros(4, 5), False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.gram_sym(a.half(), torch.zeros(4, 4), False)
    with pytest.raises(RuntimeError, match="float64 out"):
        ops.gram_sym(a.double(), torch.zeros(4, 4), False)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.gram_sym(torch.randn(6, 4).T, torch.zeros(4, 4), False)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.gram_sym(a, torch.zeros(4, 8)[:, ::2], False)
    buf = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="share memory"):
        ops.gram_sym(buf[:, :6], buf[:, 6:], False)
    with pytest.raises(RuntimeError, match="same width"):
        ops.gram_cross(a, torch.randn(3, 7), torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.gram_cross(a, torch.randn(3, 6, dtype=torch.float64), torch.zeros(4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "n,ci,co,h,w,k,s,p,d,g",
    [
        (2, 3, 16, 8, 8, 3, 1, 1, 1, 1),
        (1, 5, 7, 9, 7, 5, 2, 2, 2, 1),  # N = 1, kernel 5, stride 2, dilation 2
        (3, 8, 8, 10, 10, 3, 1, 2, 2, 8),  # depthwise, dilated
        (2, 6, 12, 7, 9, 3, 2, 1, 1, 3),  # groups 3
        (2, 16, 32, 8, 8, 1, 1, 0, 1, 1),  # 1x1
        (2, 4, 8, 5, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2),  # rectangular everything
        (1, 97, 5, 20, 20, 3, 1, 1, 1, 1),  # odd width, several row chunks
        (2, 3, 4, 40, 12, 3, 1, 2, 2, 1),  # stride-1 shifted path: 3 chunks, dilation 2
        (2, 5, 3, 6, 7, 1, 1, 1, 1, 1),  # padded 1x1 (shifted path, junk columns)
    ],
)
def test_conv2d_psg(n, ci, co, h, w, k, s, p, d, g, dtype):
    torch.manual_seed(ci * co)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, ci, h, w, dtype=dtype)
    wt = torch.randn(co, ci // g, kh, kw, dtype=dtype)
    gout = torch.randn_like(F.conv2d(x, wt, stride=s, padding=p, dilation=d, groups=g))
    res = _ext.conv2d_psg(x, gout, kernel_size=(kh, kw), stride=s, padding=p, dilation=d, groups=g)
    assert res.shape == (n, *wt.shape) and res.dtype == dtype
    ref = _ref_psg(x.double(), gout.double(), wt.shape, _pair(s), _pair(p), _pair(d), g)
    torch.testing.assert_close(res.double(), ref, **TOL[dtype])


def test_conv2d_psg_matches_torch_func():
    from torch.func import grad, vmap

    torch.manual_seed(3)
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    wt = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    gout = torch.randn(3, 6, 4, 4, dtype=torch.float64)

    def f(weight, xi, gi):
        y = F.conv2d(xi[None], weight, stride=2, padding=1, dilation=2, groups=2)
        return (y[0] * gi).sum()

    truth = vmap(grad(f), in_dims=(None, 0, 0))(wt, x, gout)
    res = ops.conv2d_psg(x, gout, 3, 3, 2, 2, 1, 1, 2, 2, 2)
    torch.testing.assert_close(res, truth, **TOL[torch.float64])  # (default 1e-7: too loose)


def test_conv2d_psg_bad_inputs():
    x, g = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.conv2d_psg(x, g, 3, 3, 1, 1, 0, 0, 1, 1, 1)
    with pytest.raises(RuntimeError, match="groups"):
        ops.conv2d_psg(x, g, 3, 3, 1, 1, 1, 1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.conv2d_psg(x.transpose(2, 3), g, 3, 3, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.conv2d_psg(x, g.double(), 3, 3, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="batch"):
        ops.conv2d_psg(x, g[:1], 3, 3, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=r"\(N, C_in, H, W\)"):
        ops.conv2d_psg(x[0], g, 3, 3, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=">= 1"):
        ops.conv2d_psg(x, g, 3, 3, 0, 1, 1, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.conv2d_psg(x.int(), g.int(), 3, 3, 1, 1, 1, 1, 1, 1, 1)
    # helper-25's fuzzing: a padding whose H + 2*ph overflowed int64 passed the size check
    # and the op wrote out of bounds (heap corruption); a kernel larger than the padded
    # input (which F.conv2d refuses) was taken as zero-padded at the bottom right
    x1, g1 = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 6, 8)
    with pytest.raises(RuntimeError, match="<= 2\\*\\*31"):
        ops.conv2d_psg(x1, g1, 1, 1, 1, 1, 2**63 - 1, 0, 1, 1, 1)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        ops.conv2d_psg(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 1, 1), 3, 3, 2, 2, 0, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="an int or a pair"):
        _ext.conv2d_psg(x, g, kernel_size=(3, 3, 3), padding=1)


def test_conv2d_psg_allocation_failure_is_an_exception():
    """Per-thread buffers were allocated inside the OpenMP region, where std::bad_alloc
    cannot propagate: the process aborted (helper-25). Under an address-space limit the
    op now raises MemoryError."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from fastntk import _ext\n"
        "resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))\n"
        "x, g = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)\n"
        "try:\n"
        "    _ext.conv2d_psg(x, g, kernel_size=3, padding=(10**9, 1), dilation=(10**9, 1))\n"
        "except MemoryError:\n"
        "    print('MemoryError')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "MemoryError", (
        r.returncode,
        r.stdout,
        r.stderr[-500:],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (1, 1, 1), (4, 16), (2, 3, 97), (5, 2, 3, 4, 2)])
@pytest.mark.parametrize("per_sample", [False, True], ids=["running", "per-sample"])
def test_affine_psg(shape, per_sample, dtype):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, dtype=dtype) * 3 + 5  # a large mean: the centring matters
    g = torch.randn(shape, dtype=dtype)
    n, c = shape[:2]
    mean = torch.randn(n, c, dtype=dtype) if per_sample else torch.randn(c, dtype=dtype)
    sgx, sg = _ext.affine_psg(x, g, mean)
    assert sgx.shape == sg.shape == (n, c) and sgx.dtype == sg.dtype == dtype
    m = mean.view(n if per_sample else 1, c, *([1] * (len(shape) - 2)))
    xd, gd = x.double(), g.double()
    truth_gx = (gd * (xd - m.double())).reshape(n, c, -1).sum(2)
    truth_g = gd.reshape(n, c, -1).sum(2)
    torch.testing.assert_close(sgx.double(), truth_gx, **TOL[dtype])
    torch.testing.assert_close(sg.double(), truth_g, **TOL[dtype])


def test_affine_psg_bad_inputs():
    x, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="differ in shape"):
        ops.affine_psg(x, g[:, :2], torch.zeros(3))
    with pytest.raises(RuntimeError, match="mean must be"):
        ops.affine_psg(x, g, torch.zeros(4))
    with pytest.raises(RuntimeError, match="mean must be"):
        ops.affine_psg(x, g, torch.zeros(3, 3))
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.affine_psg(x, g.double(), torch.zeros(3))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.affine_psg(x.transpose(1, 2).contiguous().transpose(1, 2), g, torch.zeros(3))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.affine_psg(x.half(), g.half(), torch.zeros(3).half())
    with pytest.raises(RuntimeError, match=r"\(N, C, ...\)"):
        ops.affine_psg(torch.randn(3), torch.randn(3), torch.zeros(3))


def test_env_reports():
    from fastntk._env import env

    e = env()
    assert e["csrc"] is True and e["csrc_error"] is None
    assert set(e) >= {
        "triton",
        "triton_version",
        "triton_runnable",
        "triton_error",
        "cuda",
        "device_name",
        "torch_version",
        "num_threads",
    }
    if not e["triton_runnable"]:
        assert isinstance(e["triton_error"], str)


def test_cuda_kernels_present_exactly_in_a_cuda_build():
    """A CPU torch (these machines): fastntk._C has no CUDA kernels and says why. A CUDA
    torch with nvcc (`make test-gpu-stack`, the GPU machines): they are built and registered."""
    import fastntk._C as ext
    from fastntk._env import env

    e = env()
    if torch.version.cuda is not None and os.environ.get("FASTNTK_NO_CUDA") != "1":
        assert ext.with_cuda == 1 and _ext.cuda_available() and _ext.cuda_why_not() is None
        assert e["csrc_cuda"] is True and e["csrc_cuda_error"] is None
        for op in ("gram_sym", "gram_cross", "conv2d_psg"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastntk::{op}", "CUDA")
        return
    assert ext.with_cuda == 0
    assert _ext.cuda_available() is False
    reason = _ext.cuda_why_not()
    assert "without CUDA" in reason
    assert e["csrc_cuda"] is False and e["csrc_cuda_error"] == reason
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("fastntk::gram_sym", "CUDA")

    class _OnCuda:  # enough of a tensor for the device check that runs first
        device = torch.device("cuda")

    with pytest.raises(UnsupportedError, match="no CUDA kernels"):
        _ext.gram_sym(_OnCuda(), _OnCuda())
    with pytest.raises(UnsupportedError, match="no CUDA kernels"):
        _ext.conv2d_psg(_OnCuda(), _OnCuda(), kernel_size=3)


def test_affine_psg_is_cpu_only():
    x = torch.empty(2, 3, 4, device="meta")
    with pytest.raises(UnsupportedError, match="CPU-only"):
        _ext.affine_psg(x, x, torch.empty(3, device="meta"))


def test_auto_routes_gram_blocks_by_measured_thresholds():
    """rules.gram_block under "auto": symmetric blocks from CSRC_GRAM_MIN_COLS columns, cross
    blocks from CSRC_CROSS_MIN_COLS columns and up to CSRC_CROSS_MAX_PAIRS entries go to
    the C++ kernels (where they measured faster); "csrc" takes every float block."""
    from fastntk import rules

    def applies(n1, n2, cols, backend="auto", sym=False):
        a = torch.randn(n1, cols)
        return rules._csrc_gram_applies(a, a if sym else torch.randn(n2, cols), backend)

    assert applies(8, 8, rules.CSRC_GRAM_MIN_COLS, sym=True)
    assert not applies(8, 8, rules.CSRC_GRAM_MIN_COLS - 1, sym=True)
    assert applies(16, 8, rules.CSRC_CROSS_MIN_COLS)
    assert not applies(16, 8, rules.CSRC_CROSS_MIN_COLS - 1)
    big = rules.CSRC_CROSS_MAX_PAIRS // 256 + 1
    assert not applies(big, 256, rules.CSRC_CROSS_MIN_COLS)
    assert applies(big, 256, rules.CSRC_CROSS_MIN_COLS, backend="csrc")
    assert applies(16, 8, 64, backend="csrc")
    for backend in ("csrc", "auto"):
        a = torch.randn(4, 3000, dtype=torch.float16)
        assert not rules._csrc_gram_applies(a, a, backend)  # float32/float64 only
    # and the routed blocks are right
    a, b = torch.randn(16, 2500, dtype=torch.float64), torch.randn(9, 2500, dtype=torch.float64)
    got = rules.gram_block(rules.Dense(a), rules.Dense(b), "auto")
    torch.testing.assert_close(got, a @ b.T, rtol=1e-12, atol=1e-12)
