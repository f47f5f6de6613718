"""The Gram and per-sample-gradient ops: fastntk's C++ and Triton kernels vs torch.

One benchmark group per shape, so its table compares the providers on the same inputs:

* C++ extension (CPU): ``gram_sym`` (Θ += A Aᵀ, upper tiles mirrored) vs ``a @ a.T`` and
  ``out.addmm_(a, a.T)``; ``gram_cross`` (Θ += A Bᵀ) vs the same two; ``conv2d_psg`` (per-sample
  Conv2d weight gradients without an unfold buffer) vs unfold + bmm. Skipped, with the
  reason ``fastntk.env()`` gives, where the extension does not load.
* Triton kernels (``fastntk.kernels``: ``gram``, ``conv2d_psg``) vs the same torch paths on
  a CUDA device. Skipped without one: on the CPU they run only in Triton's interpreter
  (``TRITON_INTERPRET=1``, tests/test_kernels_*.py), which checks them but is no timing.

Each op is first checked against its torch counterpart (float32, to 1e-3 of the largest
entry) on fresh outputs; the timed calls accumulate into one output, as the engine does.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from bench_conv_psg import unfold_bmm

import fastntk

GRAM_SHAPES = [(128, 16384), (512, 2048)]  # (N, P): a few-ms Gram on one CPU core
CROSS_SHAPES = [(128, 64, 16384)]  # (N1, N2, P)
CONV_SHAPES = [(16, 32, 3), (64, 8, 3), (64, 8, 1)]  # (C_in = C_out, H = W, kernel size)


def _csrc_or_skip() -> None:
    env = fastntk.env()
    if not env["csrc"]:
        pytest.skip(f"the C++ extension fastntk._C is unavailable: {env['csrc_error']}")


def _cuda_triton_or_skip() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip(
            "no CUDA device: on the CPU the Triton kernels run only in Triton's interpreter "
            "(TRITON_INTERPRET=1), a correctness check (tests/test_kernels_*.py), not a timing"
        )
    from fastntk.kernels import why_not

    reason = why_not("cuda")
    if reason is not None:
        pytest.skip(f"the Triton kernels cannot run on the GPU: {reason}")
    return torch.device("cuda")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().item()
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-3, atol=1e-3 * scale)


def _synced(fn, device: torch.device):
    """``fn`` followed by a wait for the GPU's queue: the timer sees the kernels' run."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def _operands(*shapes: tuple[int, ...], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(device) for s in shapes]


# ---- C++ extension (CPU) ----------------------------------------------------------------


@pytest.mark.parametrize("provider", ["torch.mm", "addmm_", "csrc.gram_sym"])
@pytest.mark.parametrize(("n", "p"), GRAM_SHAPES, ids=[f"{n}x{p}" for n, p in GRAM_SHAPES])
def test_gram_sym(benchmark, n: int, p: int, provider: str) -> None:
    benchmark.group = f"gram_sym A({n}, {p}) cpu"
    (a,) = _operands((n, p))
    out = torch.zeros(n, n)
    if provider == "torch.mm":
        fn = partial(torch.mm, a, a.T)
    elif provider == "addmm_":
        fn = partial(out.addmm_, a, a.T)
    else:
        _csrc_or_skip()
        fresh = torch.zeros(n, n)
        torch.ops.fastntk.gram_sym(a, fresh, False)  # in place: fresh += a aᵀ
        _close(fresh, a @ a.T)
        fn = partial(torch.ops.fastntk.gram_sym, a, out, False)
    benchmark(fn)


@pytest.mark.parametrize("provider", ["torch.mm", "addmm_", "csrc.gram_cross"])
@pytest.mark.parametrize(
    ("n1", "n2", "p"), CROSS_SHAPES, ids=[f"{a}x{b}x{c}" for a, b, c in CROSS_SHAPES]
)
def test_gram_cross(benchmark, n1: int, n2: int, p: int, provider: str) -> None:
    benchmark.group = f"gram_cross A({n1}, {p}) B({n2}, {p}) cpu"
    a, b = _operands((n1, p), (n2, p))
    out = torch.zeros(n1, n2)
    if provider == "torch.mm":
        fn = partial(torch.mm, a, b.T)
    elif provider == "addmm_":
        fn = partial(out.addmm_, a, b.T)
    else:
        _csrc_or_skip()
        fresh = torch.zeros(n1, n2)
        torch.ops.fastntk.gram_cross(a, b, fresh, False)  # in place: fresh += a bᵀ
        _close(fresh, a @ b.T)
        fn = partial(torch.ops.fastntk.gram_cross, a, b, out, False)
    benchmark(fn)


@pytest.mark.parametrize("provider", ["unfold+bmm", "csrc.conv2d_psg"])
@pytest.mark.parametrize(
    ("c", "hw", "k"), CONV_SHAPES, ids=[f"C{c}-HW{s}-k{k}" for c, s, k in CONV_SHAPES]
)
def test_conv2d_psg(benchmark, bench_n: int, c: int, hw: int, k: int, provider: str) -> None:
    n, pad = bench_n, k // 2
    benchmark.group = f"conv2d_psg N={n} C={c} HW={hw} k={k} cpu"
    x, gout = _operands((n, c, hw, hw), (n, c, hw, hw))
    if provider == "unfold+bmm":
        fn = partial(unfold_bmm, x, gout, k, pad)
    else:
        _csrc_or_skip()
        fn = partial(torch.ops.fastntk.conv2d_psg, x, gout, k, k, 1, 1, pad, pad, 1, 1, 1)
        _close(fn(), unfold_bmm(x, gout, k, pad))
    benchmark(fn)


# ---- Triton kernels (CUDA) --------------------------------------------------------------

GPU_GRAM_SHAPES = [(1024, 65536), (4096, 8192)]
GPU_CONV_SHAPES = [(128, 16, 32, 3), (128, 64, 8, 3)]  # (N, C_in = C_out, H = W, kernel)


@pytest.mark.parametrize("provider", ["torch.mm", "triton.gram"])
@pytest.mark.parametrize(("n", "p"), GPU_GRAM_SHAPES, ids=[f"{n}x{p}" for n, p in GPU_GRAM_SHAPES])
def test_triton_gram(benchmark, n: int, p: int, provider: str) -> None:
    device = _cuda_triton_or_skip()
    benchmark.group = f"gram_sym A({n}, {p}) cuda"
    (a,) = _operands((n, p), device=device)
    if provider == "torch.mm":
        fn = partial(torch.mm, a, a.T)
    else:
        from fastntk.kernels.gram import gram

        _close(gram(a), a @ a.T)
        fn = partial(gram, a, out=torch.zeros(n, n, device=device))
    benchmark(_synced(fn, device))


@pytest.mark.parametrize("provider", ["unfold+bmm", "triton.conv2d_psg"])
@pytest.mark.parametrize(
    ("n", "c", "hw", "k"),
    GPU_CONV_SHAPES,
    ids=[f"N{n}-C{c}-HW{s}-k{k}" for n, c, s, k in GPU_CONV_SHAPES],
)
def test_triton_conv2d_psg(benchmark, n: int, c: int, hw: int, k: int, provider: str) -> None:
    device = _cuda_triton_or_skip()
    pad = k // 2
    benchmark.group = f"conv2d_psg N={n} C={c} HW={hw} k={k} cuda"
    x, gout = _operands((n, c, hw, hw), (n, c, hw, hw), device=device)
    if provider == "unfold+bmm":
        fn = partial(unfold_bmm, x, gout, k, pad)
    else:
        from fastntk.kernels.conv_psg import conv2d_psg

        fn = partial(conv2d_psg, x, gout, kernel_size=k, padding=pad)
        _close(fn(), unfold_bmm(x, gout, k, pad))
    benchmark(_synced(fn, device))
