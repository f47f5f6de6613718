"""fastntk: fast, exact empirical Neural Tangent Kernels for PyTorch.

The public face is small:

* :func:`ntk` — the kernel Θ(x1, x2) of any ``nn.Module``;
* :func:`ntk_sketch` — an (N, m) sketch S with Θ ≈ S Sᵀ, for N too large for Θ;
* :func:`ntk_operator` — Θ as a linear operator (exact products Θ V, no N×N matrix);
* :func:`ntk_diag` — the exact diagonal Θ_ii in O(N) memory;
* :func:`explain` — which path each parameter takes and the memory a call needs;
* :func:`register_gram_rule` — add a per-layer rule for your own module type;
* :func:`env` — what this installation can use (C++ extension, Triton, CUDA);
* :func:`profile` — where the time of the calls inside a ``with`` block goes;
* :func:`tune_allocator` — opt-in, process-wide: let glibc keep freed memory for reuse.

Metrics live in :mod:`fastntk.metrics`, search spaces in :mod:`fastntk.spaces`,
search algorithms in :mod:`fastntk.search`; errors in :mod:`fastntk.errors`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public functions are imported on first use (PEP 562): ``import fastntk`` does not
# import torch, so ``python -m fastntk`` answers Ctrl-C while torch loads with one line
# (``fastntk/__main__.py``), and a library that embeds fastntk pays for torch when it uses it.
_LAZY = {
    "ntk": "fastntk.engine",
    "ntk_sketch": "fastntk.engine",
    "ntk_operator": "fastntk.engine",
    "ntk_diag": "fastntk.engine",
    "FastNTKError": "fastntk.errors",
    "explain": "fastntk._explain",
    "profile": "fastntk.profiling",
    "register_gram_rule": "fastntk.rules",
}

if TYPE_CHECKING:
    from fastntk._explain import explain
    from fastntk.engine import ntk, ntk_diag, ntk_operator, ntk_sketch
    from fastntk.errors import FastNTKError
    from fastntk.profiling import profile
    from fastntk.rules import register_gram_rule


# Submodules reachable as attributes after ``import fastntk`` (``fastntk.errors.InputError``).
_SUBMODULES = ("adapters", "data", "distributed", "engine", "errors", "kernels", "metrics",
               "profiling", "rules", "search", "spaces")  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"fastntk.{name}")
    else:
        raise AttributeError(f"module 'fastntk' has no attribute {name!r}")
    globals()[name] = value  # (once: later lookups do not come here)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


def env() -> dict:
    """What this installation can use, and why not where something is missing."""
    try:
        from fastntk._env import env as _env
    except ImportError as e:  # the helper module is optional
        import torch

        return {
            "csrc": False,
            "csrc_error": str(e),
            "triton": False,
            "cuda": torch.cuda.is_available(),
        }
    return _env()


def tune_allocator(mmap_threshold: int = 2**30, trim_threshold: int = 2**31 - 1) -> dict:
    """Opt-in, process-wide: make glibc keep freed memory for reuse (see
    :func:`fastntk._env.tune_allocator`; fastntk never calls it by itself)."""
    from fastntk._env import tune_allocator as _tune

    return _tune(mmap_threshold, trim_threshold)


__all__ = [
    "FastNTKError",
    "env",
    "explain",
    "ntk",
    "ntk_diag",
    "ntk_operator",
    "ntk_sketch",
    "profile",
    "register_gram_rule",
    "tune_allocator",
    "__version__",
]
