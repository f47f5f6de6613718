"""Every Triton kernel variant the launchers can pick compiles for the GPUs (no GPU here).

The interpreter tests (test_kernels_*.py) check what the kernels compute; they cannot
check that a variant lowers to GPU code: tl.dot's shape rules, the tensor-core paths of
the tf32/bf16 modes, shared memory and registers. kernels/aot.py compiles each variant
for sm_90 (H100/H200) and sm_80 (A100) with the installed Triton and its ptxas, in one
child process (the interpreter tests run in this one); this runs under the bundled Triton
and under Triton 3.6 (make test-triton-3.6). Held here: the variant compiles, spills no
registers (no local memory), fits a block's shared memory, and uses tensor cores exactly
in the tf32/bf16 modes (the ieee modes are exact float32 FMAs).
"""

from __future__ import annotations

import os

# As in the other kernel test modules, before the first `import triton`: whichever module
# pytest imports first decides how the kernels are decorated (interpreted or compiled).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from fastntk.kernels import aot  # noqa: E402
from fastntk.kernels import conv_psg as conv_mod  # noqa: E402
from fastntk.kernels import gram as gram_mod  # noqa: E402

# A thread block's shared memory limit: 227 KiB on sm_90, 163 KiB on sm_80.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TENSOR_CORES = {90: "wgmma", 80: "mma"}
PRECISIONS = {"ieee": 0, "tf32": 1, "bf16": 2}
# sm_90 with both epilogues; sm_80 with the accumulating one (the epilogue does not depend
# on the architecture).
ARCH_ACC = [(90, False), (90, True), (80, True)]
# (C_out/groups, D = C_in/groups * kh * kw): NB201 3x3 at C=16 and 64, a 1x1, the stem
# (3 input channels), a depthwise 3x3, a ViT token Linear as the launcher lays it out.
CONV_SHAPES = [(16, 144), (64, 576), (16, 16), (16, 27), (1, 9), (192, 48)]


def _gram_spec(arch, accumulate, precision, symmetric):
    block_m, block_n, block_k, num_warps = gram_mod._config(torch.device("cuda"))
    if symmetric:
        block_n = block_m  # as the launcher does
    operand = "*bf16" if precision == "bf16" else "*fp32"
    return dict(
        kernel="fastntk.kernels.gram:_gram_kernel",
        constexprs=dict(SYMMETRIC=symmetric, ACCUMULATE=accumulate,
                        PRECISION=PRECISIONS[precision], BF16_EMULATE=False,
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
        arch=arch, num_warps=num_warps,
        pointers={"a_ptr": operand, "b_ptr": operand, "pair_i_ptr": "*i32", "pair_j_ptr": "*i32"},
    )  # fmt: skip


def _conv_spec(arch, accumulate, c_out_g, d):
    cfg = conv_mod.tiles(c_out_g, d, on_gpu=True)
    num_warps = cfg.pop("num_warps")
    return dict(
        kernel="fastntk.kernels.conv_psg:_psg_kernel",
        constexprs=dict(ACCUMULATE=accumulate, **cfg),
        arch=arch,
        num_warps=num_warps,
    )


GRAM_CASES = [(a, acc, p, s) for a, acc in ARCH_ACC for p in PRECISIONS for s in (True, False)]
CONV_CASES = [(a, acc, c, d) for a, acc in ARCH_ACC for c, d in CONV_SHAPES]


@pytest.fixture(scope="module")
def compiled():
    """All variants, compiled once in a child process: {("gram"|"conv", case): Compiled}."""
    keys = [("gram", c) for c in GRAM_CASES] + [("conv", c) for c in CONV_CASES]
    specs = [_gram_spec(*c) if kind == "gram" else _conv_spec(*c) for kind, c in keys]
    return dict(zip(keys, aot.compile_many(specs), strict=True))


def _check(c: aot.Compiled, arch: int) -> None:
    assert c.arch == arch
    assert c.shared_bytes <= SHARED_LIMIT[arch], f"{c.shared_bytes} B of shared memory"
    if c.local_bytes is not None:
        assert c.local_bytes == 0, f"{c.name}: {c.local_bytes} B of local memory (spills)"
        assert 0 < c.registers <= 255


@pytest.mark.parametrize(
    "case",
    GRAM_CASES,
    ids=lambda c: f"sm{c[0]}-{'acc' if c[1] else 'new'}-{c[2]}-{'sym' if c[3] else 'cross'}",
)
def test_gram_variants_compile(compiled, case):
    arch, _, precision, _ = case
    c = compiled[("gram", case)]
    _check(c, arch)
    assert c.name == "_gram_kernel"
    assert c.tensor_cores == (None if precision == "ieee" else TENSOR_CORES[arch])


@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda c: f"sm{c[0]}-{'acc' if c[1] else 'new'}-{c[2]}x{c[3]}"
)
def test_conv_psg_variants_compile(compiled, case):
    c = compiled[("conv", case)]
    _check(c, case[0])
    assert c.name == "_psg_kernel"
    assert c.tensor_cores is None  # ieee: the per-sample gradients stay exact float32


def test_compile_for_needs_every_constexpr():
    with pytest.raises(ValueError, match="no value for constexpr"):
        aot.compile_for(gram_mod._gram_kernel, dict(SYMMETRIC=True))


def test_compile_many_reports_the_childs_error():
    with pytest.raises(RuntimeError, match="no value for constexpr"):
        aot.compile_many([dict(kernel="fastntk.kernels.gram:_gram_kernel", constexprs={})])
