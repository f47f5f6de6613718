"""Triton Gram kernel (kernels/gram.py) in Triton's CPU interpreter.

Held against the PyTorch reference and a float64 ground truth. Odd sizes on purpose.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from fastntk.kernels import why_not  # noqa: E402
from fastntk.kernels.gram import gram, gram_reference  # noqa: E402

pytestmark = pytest.mark.skipif(why_not("cpu") is not None, reason=str(why_not("cpu")))

SHAPES = [(1, 97), (5, 1023), (97, 97), (33, 1)]


def _tol(p: int) -> float:
    # float32 accumulation of P products of N(0,1) entries: error grows ~ sqrt(P) * eps * |x|
    return 1e-5 * max(1.0, p) ** 0.5 * 4


@pytest.mark.parametrize("n,p", SHAPES)
def test_symmetric_matches_fp64(n, p):
    torch.manual_seed(n * 1000 + p)
    a = torch.randn(n, p)
    res = gram(a)
    truth = a.double() @ a.double().T
    assert res.dtype == torch.float32 and res.shape == (n, n)
    torch.testing.assert_close(res.double(), truth, rtol=1e-5, atol=_tol(p))
    torch.testing.assert_close(res, gram_reference(a), rtol=1e-5, atol=_tol(p))
    assert torch.equal(res, res.T)  # mirrored tiles are bit-identical


@pytest.mark.parametrize("n1,n2,p", [(1, 5, 97), (97, 5, 1023), (5, 97, 33)])
def test_cross_matches_fp64(n1, n2, p):
    torch.manual_seed(7)
    a, b = torch.randn(n1, p), torch.randn(n2, p)
    res = gram(a, b)
    torch.testing.assert_close(res.double(), a.double() @ b.double().T, rtol=1e-5, atol=_tol(p))


def test_accumulates_into_out_with_strides():
    torch.manual_seed(1)
    a = torch.randn(40, 300)
    big = torch.full((50, 60), 2.0)
    out = big[3:43, 10:50]  # non-contiguous (row stride 60) view
    res = gram(a, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(big[3:43, 10:50], 2.0 + gram_reference(a), rtol=1e-5, atol=1e-3)
    assert torch.all(big[:3] == 2.0) and torch.all(big[:, :10] == 2.0)  # nothing outside
    b = torch.randn(20, 300)
    out2 = torch.ones(40, 20)
    gram(a, b, out=out2)
    torch.testing.assert_close(out2, 1.0 + a @ b.T, rtol=1e-5, atol=1e-3)


def test_non_contiguous_inputs():
    torch.manual_seed(2)
    at = torch.randn(97, 37).T  # (37, 97), column-major
    torch.testing.assert_close(gram(at), gram_reference(at), rtol=1e-5, atol=1e-4)
    b = torch.randn(10, 194)[:, ::2]  # column stride 2
    torch.testing.assert_close(gram(at, b), at @ b.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_paths_run(precision):
    # The interpreter multiplies in numpy: this checks the code path only. The tf32/bf16
    # error has to be measured on a GPU (against torch.mm's own error in that dtype).
    torch.manual_seed(3)
    a = torch.randn(20, 150)
    res = gram(a, precision=precision)
    ref = gram_reference(a)
    rel = (res - ref).abs().max() / ref.abs().max()
    assert rel < (1e-2 if precision == "tf32" else 5e-2)


def test_half_inputs_and_fp64_fallback():
    torch.manual_seed(4)
    a = torch.randn(9, 70)
    torch.testing.assert_close(
        gram(a.bfloat16()), gram_reference(a.bfloat16()), rtol=1e-4, atol=1e-3
    )
    res64 = gram(a.double())
    assert res64.dtype == torch.float64
    # (float64 falls back to torch.mm: exact; assert_close's float64 default, 1e-7, passes
    # a float32 round trip)
    torch.testing.assert_close(res64, a.double() @ a.double().T, rtol=1e-10, atol=1e-10)


def test_empty_and_bad_inputs():
    assert gram(torch.randn(0, 5)).shape == (0, 0)
    torch.testing.assert_close(gram(torch.randn(3, 0)), torch.zeros(3, 3))
    with pytest.raises(ValueError):
        gram(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError):
        gram(torch.randn(3, 4, 1))
    with pytest.raises(ValueError):
        gram(torch.randn(3, 4), precision="fp8")
    with pytest.raises(ValueError):
        gram(torch.randn(3, 4), out=torch.zeros(3, 4))
    with pytest.raises(TypeError):
        gram(torch.randn(3, 4), out=torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(TypeError):
        gram(torch.ones(3, 4, dtype=torch.int32))
