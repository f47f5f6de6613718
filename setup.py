"""Build script for fastntk.

Install for development with ``pip install --no-build-isolation -e .`` (the
``--no-build-isolation`` flag makes the C++ extension build against the torch
that is already installed instead of a second copy pulled into a temporary
build environment; see README).

Environment variables:
    FASTNTK_NO_EXT=1       skip the C++ extension (the package works without it).
    FASTNTK_NO_CUDA=1      build the CPU ops only, even where a CUDA build is possible.
    TORCH_CUDA_ARCH_LIST   GPU architectures of a CUDA build (default: the visible GPU's,
                           or "8.0;9.0" when none is visible).

The extension always holds the CPU ops (``csrc/*.cpp``). Where torch is a CUDA build and
nvcc is found (``CUDA_HOME``), it also gets the CUDA kernels of ``csrc/cuda/`` for the same
ops (``fastntk._C.with_cuda == 1``); on these CPU machines torch is a CPU build, so the
CUDA sources are only compiled by the tests (``tests/test_csrc_cuda_build.py``).
"""

from __future__ import annotations

import os
import shutil

from setuptools import find_packages, setup

packages = find_packages(include=["fastntk", "fastntk.*"]) + ["fastntk.kernels"]


def _cuda_build() -> tuple[bool, str]:
    """(build the CUDA kernels?, why or why not)."""
    if os.environ.get("FASTNTK_NO_CUDA") == "1":
        return False, "FASTNTK_NO_CUDA=1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__}, CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}"


def _extensions():
    """Return (ext_modules, cmdclass); empty when the extension is disabled or torch is absent."""
    if os.environ.get("FASTNTK_NO_EXT") == "1":
        return [], {}
    sources = (
        sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
        if os.path.isdir("csrc")
        else []
    )
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch not importable at build time: pure-Python install
        return [], {}
    # -ffp-contract=fast: let the vectorised a*b+c of csrc/tile.h become FMAs (an ISO -std
    # turns contraction off by default). C++20: torch 2.13's headers use it (bit-field
    # initialisers warn under C++17). -Wno-psabi: tile.h's AVX2 clones pass vectors by value
    # inside one translation unit; GCC's note on the ABI change does not concern them.
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=fast", "-Wno-psabi"]
    cuda, why = _cuda_build()
    print(f"fastntk: CUDA kernels {'built' if cuda else 'not built'}: {why}")
    if cuda:
        cuda_dir = os.path.join("csrc", "cuda")
        sources += sorted(
            os.path.join(cuda_dir, f) for f in os.listdir(cuda_dir) if f.endswith((".cpp", ".cu"))
        )
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            import torch

            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = CUDAExtension(
            name="fastntk._C",
            sources=sources,
            define_macros=[("FASTNTK_WITH_CUDA", "1")],
            # No --use_fast_math: the kernels are held to the float64 oracle.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            name="fastntk._C", sources=sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )
    # A CUDA build compiles with ninja (in parallel) where it is installed; the CPU build
    # stays on setuptools' own compiler calls.
    ninja = cuda and shutil.which("ninja") is not None
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=ninja)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastntk",
    version="0.1.0",
    description="Fast, exact empirical Neural Tangent Kernels for PyTorch, and NTK-based NAS",
    packages=packages,
    package_dir={"fastntk.kernels": "kernels"},
    package_data={"fastntk": ["data/*.npz", "data/*.csv.gz", "data/*.md", "data/*.json"]},
    python_requires=">=3.10",
    # the core: torch, numpy, tqdm (progress bars); the CLI and metrics: scipy (rank
    # correlations of `fastntk evaluate`); plotting, Triton and the tests are extras
    install_requires=["torch>=2.4", "numpy>=1.24", "tqdm>=4.60", "scipy>=1.10"],
    extras_require={
        "triton": ["triton>=3.6"],
        "plot": ["matplotlib>=3.5"],  # fastntk evaluate --plot
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "scipy>=1.10",
            "matplotlib>=3.5",
            "transformers>=5.0",  # tests/test_hf_zoo.py
        ],
    },
    entry_points={"console_scripts": ["fastntk=fastntk.cli:entry"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
