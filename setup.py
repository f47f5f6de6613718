"""Build script for fastntk.

Install for development with ``pip install --no-build-isolation -e .`` (the
``--no-build-isolation`` flag makes the C++ extension build against the torch
that is already installed instead of a second copy pulled into a temporary
build environment; see README).

Environment variables:
    FASTNTK_NO_EXT=1       skip the C++ extension (the package works without it).

The extension is CPU-only; fastntk's GPU kernels are the Triton kernels of ``kernels/``.
"""

from __future__ import annotations

import os

from setuptools import find_packages, setup

packages = find_packages(include=["fastntk", "fastntk.*"]) + ["fastntk.kernels"]


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
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch not importable at build time: pure-Python install
        return [], {}
    ext = CppExtension(
        name="fastntk._C",
        sources=sources,
        # -ffp-contract=fast: let the vectorised a*b+c of csrc/tile.h become FMAs (ISO
        # -std=c++17 turns contraction off by default).
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=fast"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastntk",
    version="0.1.0",
    description="Fast, exact empirical Neural Tangent Kernels for PyTorch, and NTK-based NAS",
    packages=packages,
    package_dir={"fastntk.kernels": "kernels"},
    package_data={"fastntk": ["data/*.npz", "data/*.csv.gz", "data/*.md"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy>=1.24"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "scipy>=1.10"],
    },
    entry_points={"console_scripts": ["fastntk=fastntk.cli:entry"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
