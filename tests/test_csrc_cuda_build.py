"""The CUDA sources of the C++ extension (csrc/cuda/) compile here.

These machines have nvcc but no GPU and a CPU build of torch, so a CUDA build of
``fastntk._C`` is never made here (setup.py builds it where torch is a CUDA build); what
runs on a GPU is checked by ``bench/gpu_check.py`` there. This file holds the sources to
what can be checked without one:

* the kernels (``gram.cu``, ``conv_psg.cu``, torch-free) compile with nvcc for Hopper
  (sm_90) and Ampere (sm_80) with every warning an error, and without register spills;
* the torch glue (``ops_cuda.cpp``, and ``ops.cpp`` with ``FASTNTK_WITH_CUDA``) compiles
  against this torch's headers. The CPU wheel ships the c10/cuda headers but not the one
  CMake generates (``c10/cuda/impl/cuda_cmake_macros.h``); a stand-in with the CUDA
  wheel's single definition is written for the check.

``FASTNTK_REQUIRE_NVCC=1`` (CI) makes a missing nvcc an error instead of a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
)

if NVCC is None and os.environ.get("FASTNTK_REQUIRE_NVCC") == "1":
    raise RuntimeError("FASTNTK_REQUIRE_NVCC=1 but nvcc is not on PATH (nor /usr/local/cuda/bin)")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources not compiled")


def _cuda_include() -> str:
    """The CUDA toolkit's include folder, next to nvcc's bin/ (or /usr/local/cuda's)."""
    for base in (os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"):
        inc = os.path.join(base, "include")
        if os.path.exists(os.path.join(inc, "cuda_runtime.h")):
            return inc
    pytest.fail(f"cuda_runtime.h not found beside {NVCC} or in /usr/local/cuda/include")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("source", ["gram.cu", "conv_psg.cu"])
def test_kernels_compile(tmp_path, source, arch):
    obj = tmp_path / (source + ".o")
    proc = _run(
        [
            NVCC,
            "-std=c++17",
            "-O3",
            f"-arch={arch}",
            "-Werror",
            "all-warnings",
            "-Xptxas",
            "-v",
            "-c",
            os.path.join(CUDA_DIR, source),
            "-o",
            str(obj),
        ]
    )
    assert obj.stat().st_size > 0
    ptxas = [line for line in proc.stderr.splitlines() if "ptxas info" in line]
    # one "Used N registers" line per kernel instantiation: 4 Gram ones, 2 conv ones
    used = [line for line in ptxas if "registers" in line]
    assert len(used) == (4 if source == "gram.cu" else 2), proc.stderr
    spills = [
        line
        for line in ptxas
        if "spill" in line
        and not line.strip().endswith("0 bytes spill stores, 0 bytes spill loads")
    ]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_torch_glue_compiles(tmp_path):
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    gxx = shutil.which("g++") or shutil.which("c++")
    assert gxx is not None, "no C++ compiler"
    incs = [str(tmp_path), *include_paths(), _cuda_include(), sysconfig.get_paths()["include"]]
    cmd = [
        gxx,
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-Wno-psabi",
        "-DFASTNTK_WITH_CUDA=1",
        *[f"-I{p}" for p in incs],
        os.path.join(CUDA_DIR, "ops_cuda.cpp"),
        os.path.join(ROOT, "csrc", "ops.cpp"),
    ]
    proc = _run(cmd)
    ours = [
        line
        for line in proc.stderr.splitlines()
        if "warning" in line and "/csrc/" in line and "site-packages" not in line
    ]
    assert not ours, "\n".join(ours)
