"""The kernels of a model that the metrics need: every engine call of the metrics is here.

The metrics sit above the engine: they call :func:`fastntk.ntk` (as ``ntk`` here, one place
to count or replace the calls) and never change the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from fastntk._model import BN_MODES
from fastntk.engine import ntk
from fastntk.errors import InputError, OptionError

__all__ = ["BN_MODES", "joint_kernels", "kernel_of", "ntk", "ntk_kwargs"]


def ntk_kwargs(bn: str, params: Any, output: Any, dtype: Any, chunk_size: Any) -> dict:
    """The keyword arguments of :func:`fastntk.ntk` for a metric's kernels (checked: ``bn``
    one of :data:`BN_MODES`; ``output`` not ``"full"``, every metric needs a (N, N) kernel)."""
    if bn not in BN_MODES:
        raise OptionError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if isinstance(output, str) and output == "full":
        raise OptionError("metrics need a (N, N) kernel: output='full' is not accepted")
    kw: dict[str, Any] = {"output": output, "bn": bn, "params": params}
    if dtype is not None:
        kw["dtype"] = dtype
    if chunk_size is not None:
        kw["chunk_size"] = chunk_size
    return kw


def kernel_of(model: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """Θ(x, x) on the CPU in the engine's computation dtype, which sets the spectral
    metrics' rounding tolerance (one engine call; with ``bn="batch"`` x is one BN batch)."""
    return ntk(model, x, None, **kw).detach().cpu()


def joint_kernels(
    model: nn.Module, x: torch.Tensor, extras: Sequence[torch.Tensor], kw: dict
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Θ(x, x) and the cross kernels Θ(e, x), all blocks of ONE engine call on [x; e...].

    With sample-independent BatchNorm (``eval``, ``per_sample``) every block equals the
    kernel computed on its own. With ``bn="batch"`` the concatenated batch is one
    BatchNorm batch (the engine's cross-kernel convention: "x1 and x2 form one batch"),
    so the blocks are a single, consistent kernel of one network function.
    """
    n = x.shape[0]
    for e in extras:
        if e.shape[1:] != x.shape[1:] or e.dtype != x.dtype:
            raise InputError(
                f"the test batch has per-sample shape {tuple(e.shape[1:])} ({e.dtype}) but the "
                f"train batch {tuple(x.shape[1:])} ({x.dtype}): both must match"
            )
    big = kernel_of(model, torch.cat([x, *extras], dim=0), kw)
    out = []
    start = n
    for e in extras:
        out.append(big[start : start + e.shape[0], :n])
        start += e.shape[0]
    return big[:n, :n], out
