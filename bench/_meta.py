"""What a benchmark table records about the code it measured.

``git_sha()``: the commit, from ``FASTNTK_GIT`` where it is set (the lent GPU machine
gets a copy of the working tree without ``.git``: ``bench/gpu_suite.sh`` is started with
the SHA in that variable), else from ``git rev-parse`` in the repository, else
``"unknown"``. A tree with uncommitted changes is marked ``+dirty``.
"""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_sha() -> str:
    sha = os.environ.get("FASTNTK_GIT", "").strip()
    if sha:
        return sha
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def gpu_stack() -> str:
    """The CUDA side of a table's machine line: CUDA, cuDNN and Triton versions and the TF32
    state (PyTorch runs float32 convolutions in TF32 by default on Ampere and later)."""
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return (
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, triton {tv}, "
        f"TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, "
        f"TF32 matmuls {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    )
