"""The compiled backends inside the engine, against the float64 oracle.

``method="triton"`` runs fastntk's Triton kernels (here in Triton's
interpreter, ``TRITON_INTERPRET=1``, on small shapes): the Gram, the per-sample Conv2d
gradient and the per-sample gradient of Linear layers on tokens; the C++ extension's
per-sample convolution gradient runs inside the engine with backend "csrc".
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from reference import TOL, full_kernel, reduce, rel_err

import fastntk
import fastntk.errors
from fastntk import _ext

os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")


class MapsNet(nn.Module):
    """Convolutions with >= 1024 output positions (where the C++ op is chosen) and small ones."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=2, dilation=2, groups=1, bias=False)
        self.c = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        h = self.bn(self.c(h))
        return self.fc(torch.tanh(h).mean((2, 3)))


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    m = MapsNet()
    x1, x2 = torch.randn(3, 2, 32, 32), torch.randn(2, 2, 32, 32)
    return m, x1, x2, full_kernel(m, x1, x2)


@pytest.mark.skipif(not _ext.available(), reason=f"C++ extension not built: {_ext.why_not()}")
@pytest.mark.parametrize("output", ["sum", "full"])
def test_engine_with_csrc_conv(case, output):
    """The C++ per-sample conv gradient inside the engine (method "csrc"; not chosen by
    "auto", which measured the grouped strategy faster)."""
    m, x1, x2, ref = case
    theta = fastntk.ntk(m, x1, x2, output=output, method="csrc", dtype=torch.float64)
    assert rel_err(theta, reduce(ref, output)) <= TOL[torch.float64]


def _triton_why_not():
    from fastntk.kernels import why_not

    return why_not("cpu")


@pytest.mark.skipif(_triton_why_not() is not None, reason=str(_triton_why_not()))
@pytest.mark.parametrize("output", ["sum", "trace"])
def test_triton_method(case, output):
    m, x1, x2, ref = case
    theta = fastntk.ntk(m, x1, x2, output=output, method="triton")
    assert theta.dtype == torch.float32
    assert rel_err(theta, reduce(ref, output)) <= TOL[torch.float32]
    sym = fastntk.ntk(m, x1, output=output, method="triton")
    assert rel_err(sym, reduce(full_kernel(m, x1), output)) <= TOL[torch.float32]


def test_triton_without_interpreter_or_gpu_is_a_clear_error(case, monkeypatch):
    m, x1, _, _ = case
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton method can run")
    with pytest.raises(fastntk.errors.UnsupportedError, match="triton"):
        fastntk.ntk(m, x1, method="triton")


@pytest.mark.skipif(not _ext.available(), reason=f"C++ extension not built: {_ext.why_not()}")
def test_compiled_conv_gradients_per_row_range(case, monkeypatch):
    """A layer cut into row ranges (column blocks): the compiled kernels take only the
    range's output channels (they computed every channel once per range, ranges x the
    work), and the kernel is still exact."""
    from fastntk import _ext as ext

    seen = []
    real = ext.conv2d_psg

    def spy(x, gout, **kw):
        seen.append(gout.shape[1])
        return real(x, gout, **kw)

    monkeypatch.setattr(ext, "conv2d_psg", spy)
    m, x1, x2, ref = case
    widest = max(c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d))
    for output, passes in (("sum", 1), ("trace", 3)):  # (trace: the logits' rows stacked)
        seen.clear()
        theta = fastntk.ntk(
            m, x1, x2, output=output, method="csrc", chunk_size=(3, 20), dtype=torch.float64
        )
        assert rel_err(theta, reduce(ref, output)) <= TOL[torch.float64]
        assert seen and max(seen) < passes * widest, (output, seen)


def test_csrc_method_without_the_extension_is_a_clear_error(case, monkeypatch):
    m, x1, _, _ = case
    monkeypatch.setattr(_ext, "available", lambda: False)
    with pytest.raises(fastntk.errors.UnsupportedError, match="csrc"):
        fastntk.ntk(m, x1, method="csrc")


@pytest.mark.skipif(_triton_why_not() is not None, reason=str(_triton_why_not()))
def test_triton_conv_gradients_per_row_range(case):
    m, x1, x2, ref = case
    for output in ("sum", "trace"):
        theta = fastntk.ntk(m, x1, x2, output=output, method="triton", chunk_size=(3, 20))
        assert rel_err(theta, reduce(ref, output)) <= TOL[torch.float32]


class TokenNet(nn.Module):
    """A Linear layer on (N, T, d) tokens (the per-sample gradient sums over T) and a head."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x)).mean(1))


@pytest.mark.skipif(_triton_why_not() is not None, reason=str(_triton_why_not()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_linear_on_tokens(dtype, monkeypatch):
    """Linear layers on tokens take the Triton kernel under method="triton" (whole layers
    and row ranges), against the oracle."""
    from fastntk.kernels import conv_psg

    calls = []
    real = conv_psg.linear_psg

    def spy(u, g, **kw):
        calls.append(tuple(g.shape))
        return real(u, g, **kw)

    monkeypatch.setattr(conv_psg, "linear_psg", spy)
    torch.manual_seed(0)
    m = TokenNet()
    x1, x2 = torch.randn(3, 6, 5), torch.randn(2, 6, 5)
    ref = full_kernel(m, x1, x2)
    for output in ("sum", "trace"):
        for chunk in (None, (3, 10)):  # (3, 10): tok.weight in row ranges of one row
            calls.clear()
            theta = fastntk.ntk(
                m, x1, x2, output=output, method="triton", chunk_size=chunk, dtype=dtype
            )
            assert rel_err(theta, reduce(ref, output)) <= TOL[dtype], (output, chunk)
            assert calls, (output, chunk)
            if chunk is not None:
                assert max(c[2] for c in calls) < 7, calls
