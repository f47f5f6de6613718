"""Block features: AZ-NAS's expressivity and trainability of a network's block outputs.

**Expressivity**, :func:`feature_entropy` (s_E, Lee & Ham, CVPR 2024, Eq. 2): for each
block output F, the rows of F (one per sample and spatial position or token, one column
per channel) are centred and their (C, C) covariance Σ = FᵀF / rows is decomposed; with
its eigenvalues λ_1..λ_C normalised to p_i = λ_i / Σ_j λ_j, the block's score is the
entropy -Σ p_i log p_i (nats: 0 when the features span one direction, log C when they are
isotropic), and the network's score is the sum over its blocks. A block whose output is
constant has no spectrum to normalise: the score is NaN (undefined; a search ranks it
last).

**Trainability**, :func:`block_trainability` (s_T): how close each block's
Jacobian is to norm-preserving, from one backward per block (see there).

Both are zero-cost proxies beside the kernel metrics, not NTK quantities: one forward
(and for trainability a backward through each block), no kernel. The forward runs with
private copies of the parameters and buffers in the requested BatchNorm mode
(:func:`fastntk._model.model_state`), so the user's model is not changed;
:func:`feature_metrics` computes both from one forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from fastntk import _args, _model
from fastntk.errors import InputError, InputTypeError, OptionError
from fastntk.metrics.checks import check_batch

__all__ = [
    "FEATURE_METRICS",
    "block_entropies",
    "block_trainability",
    "feature_entropy",
    "feature_metrics",
]


def _resolve_blocks(model: nn.Module, blocks: Any) -> list[nn.Module]:
    """``blocks`` as submodules of ``model``: modules or their qualified names."""
    if blocks is None or isinstance(blocks, (str, nn.Module)) or not isinstance(blocks, Sequence):
        raise OptionError(
            "blocks must be a list of the model's submodules (or their names, as "
            f"named_modules() gives them) whose outputs are measured, got {blocks!r}"
        )
    if not blocks:
        raise OptionError("blocks is empty: name at least one submodule whose output to measure")
    named = dict(model.named_modules())
    ids = {id(m) for m in named.values()}
    out = []
    for b in blocks:
        if isinstance(b, str):
            if b not in named:
                raise OptionError(f"blocks: the model has no submodule named {b!r}")
            out.append(named[b])
        elif isinstance(b, nn.Module):
            if id(b) not in ids:
                raise OptionError(f"blocks: {type(b).__name__} is not a submodule of the model")
            out.append(b)
        else:
            raise OptionError(f"blocks holds {type(b).__name__}, not a module or a name")
    return out


def _rows(f: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(rows, channels) float64 view of ``f``: every index but the channel's is a row."""
    if f.dim() < 2:
        raise InputError(f"a block output of shape {tuple(f.shape)} has no channel dimension")
    c = channel_dim % f.dim()
    if c == 0:
        raise OptionError("channel_dim cannot be the batch dimension 0")
    return f.movedim(c, -1).reshape(-1, f.shape[c]).to(torch.float64)


def _entropy(f: torch.Tensor, channel_dim: int) -> float:
    """Entropy of the normalised covariance spectrum of ``f``'s channels (float64)."""
    eps = torch.finfo(f.dtype).eps if f.is_floating_point() else 0.0
    rows = _rows(f.detach(), channel_dim)
    if not torch.isfinite(rows).all():
        raise InputError("a block output is not finite")
    n, width = rows.shape
    scale = float(rows.abs().max()) if rows.numel() else 0.0
    rows = rows - rows.mean(dim=0)
    lam = torch.linalg.eigvalsh(rows.T @ rows / n).clamp_min(0.0)
    total = float(lam.sum())
    # A constant output has no direction to spread over. Computed in f's precision, its
    # centred rows are rounding residue, up to about n eps |f|max each (a mean's rounding):
    # a total variance within that is a constant's, whose spectrum would be noise.
    if total <= width * n * (eps * scale) ** 2:
        return math.nan
    p = lam / total
    p = p[p > 0]  # 0 log 0 = 0
    return float(-(p * p.log()).sum())


def _block_outputs(
    model: nn.Module,
    x: torch.Tensor,
    blocks: Sequence[nn.Module | str],
    channel_dim: int,
    bn: str,
    dtype: torch.dtype | None,
    cut: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each block's output of one forward on private copies in BatchNorm mode ``bn``, and
    what the rest of the forward saw in its place.

    ``cut``: the rest of the forward sees a detached copy of each block's output that
    requires grad (the second list), so block l's output (the first list) carries the
    graph of block l alone, as a function of block l-1's copy; else the forward runs
    without grad and the two lists are the same.
    """
    x = check_batch(x, "x")
    channel_dim = _args.integer(channel_dim, "channel_dim", None)
    if channel_dim == 0:  # (a negative one naming dim 0 is caught per output, by its rank)
        raise OptionError("channel_dim cannot be the batch dimension 0")
    if bn not in _model.BN_MODES:
        raise OptionError(f"bn must be one of {_model.BN_MODES}, got {bn!r}")
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    mods = _resolve_blocks(model, blocks)
    outputs: dict[int, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
            if not isinstance(out, torch.Tensor):
                raise InputTypeError(
                    f"block {index} ({type(_m).__name__}) returned {type(out).__name__}, "
                    "not a tensor: name the submodule whose output is the feature map"
                )
            outputs[index] = seen[index] = out
            if cut and out.is_floating_point():
                seen[index] = out.detach().requires_grad_(True)
                return seen[index]
            return None

        return hook

    with _model.model_state(model, bn):
        handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(mods)]
        try:
            floats = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
            if dtype is None and not floats:  # (no parameter to take it from: the input's)
                dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
            dtype = _model.resolve_dtype(dtype, model, floats)
            copies = _model.make_copies(model, {}, dtype)
            with torch.set_grad_enabled(cut):
                copies.call(model, x if _model.is_index(x) else x.to(dtype))
        finally:
            for h in handles:
                h.remove()
    missing = [i for i in range(len(mods)) if i not in outputs]
    if missing:
        raise InputError(f"blocks {missing} did not run in the model's forward")
    return [outputs[i] for i in range(len(mods))], [seen[i] for i in range(len(mods))]


def block_entropies(
    model: nn.Module,
    x: torch.Tensor,
    blocks: Sequence[nn.Module | str],
    *,
    channel_dim: int = 1,
    bn: str = "eval",
    dtype: torch.dtype | None = None,
) -> list[float]:
    """The entropy of each block's output spectrum (see the module docstring), in order.

    Args:
        model: the network (not changed); its forward is run once on ``x``.
        x: (N, ...) batch.
        blocks: the submodules (or their qualified names) whose outputs are measured; a
            block that runs several times contributes its last output.
        channel_dim: the channel dimension of the block outputs (1 for (N, C, H, W)
            feature maps, -1 for (N, tokens, D)); every other dimension but the batch's
            indexes a row.
        bn: BatchNorm mode of the forward (``"eval"``, ``"batch"``, ``"per_sample"``).
        dtype: the forward's dtype (default: the parameters' own); the spectrum is
            computed in float64 either way.

    Returns:
        one float per block (NaN for a constant output).
    """
    outs, _ = _block_outputs(model, x, blocks, channel_dim, bn, dtype, cut=False)
    return [_entropy(f, channel_dim) for f in outs]


def _pair_score(f_in: torch.Tensor, f_out: torch.Tensor, channel_dim: int, g) -> float:
    """AZ-NAS's score of one block: -σ - 1/σ + 2 for σ the spectral norm of the block's
    channel Jacobian estimate E[u vᵀ] (v a Rademacher cotangent on the output, u = vᵀ J
    on the input, the expectation over the rows: samples × positions)."""
    v = torch.randint(0, 2, f_out.shape, generator=g, device=f_out.device)
    v = v.to(f_out.dtype) * 2 - 1
    u = None
    if f_out.requires_grad:  # (else it depends on no copy, the previous block's neither)
        (u,) = torch.autograd.grad(f_out, f_in, v, allow_unused=True)
    if u is None:
        raise InputError("a block's output does not depend on the previous block's: "
                         "blocks must be consecutive stages of the forward")  # fmt: skip
    if u.shape == v.shape and torch.equal(u, v):
        return -math.inf  # the identity: AZ-NAS scores a block that does nothing worst
    c = channel_dim % u.dim()
    if u.dim() == v.dim() == 4 and c == 1 and u.shape[2:] != v.shape[2:]:
        # a strided block: each output position gets its s x s input patch's channels
        s = u.shape[2] // v.shape[2]
        if u.shape[2] != s * v.shape[2] or u.shape[3] != s * v.shape[3]:
            raise InputError(f"block outputs {tuple(f_in.shape)} -> {tuple(f_out.shape)}: "
                             "the resolution is not divided by one integer stride")  # fmt: skip
        u = torch.nn.functional.pixel_unshuffle(u, s)
    uu, vv = _rows(u, channel_dim), _rows(v, channel_dim)
    if uu.shape[0] != vv.shape[0]:
        raise InputError(f"block outputs {tuple(f_in.shape)} -> {tuple(f_out.shape)} have "
                         "no position-wise correspondence")  # fmt: skip
    sigma = float(torch.linalg.matrix_norm(uu.T @ vv / vv.shape[0], ord=2))
    if not math.isfinite(sigma):
        raise InputError("a block's Jacobian is not finite")
    return -math.inf if sigma == 0.0 else -sigma - 1.0 / sigma + 2.0


def block_trainability(
    model: nn.Module,
    x: torch.Tensor,
    blocks: Sequence[nn.Module | str],
    *,
    channel_dim: int = 1,
    bn: str = "eval",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> float:
    """AZ-NAS's trainability s_T (Lee & Ham, CVPR 2024): how close each block's
    Jacobian is to norm-preserving.

    For consecutive blocks l-1, l with outputs F_in, F_out (rows: samples × positions),
    a Rademacher cotangent V on F_out gives U = Vᵀ ∂F_out/∂F_in on F_in, and
    M = UᵀV / rows estimates the (C_in, C_out) channel Jacobian's spectrum; with σ its
    largest singular value, the block scores -σ - 1/σ + 2 (at most 0, at σ = 1: gradients
    neither vanish nor explode through it). The network's score is the mean over the
    block pairs; higher is better. A block that is the identity, or whose output ignores
    its input (σ = 0), scores -inf, as in AZ-NAS. A strided block's input gradient is
    regrouped by ``pixel_unshuffle`` so that its rows match the output's positions.

    Args:
        model: the network (not changed); one forward and one backward per block pair.
        x: (N, ...) batch.
        blocks: at least two submodules (or names), each taking the previous one's output
            (block l's output is differentiated with respect to block l-1's).
        channel_dim, bn, dtype: as :func:`block_entropies`.
        seed: the Rademacher cotangents' seed (a fixed seed gives the same score).

    Returns:
        the mean block score (float; -inf if a block does nothing).
    """
    return feature_metrics(model, x, blocks, ["block_trainability"], channel_dim=channel_dim,
                           bn=bn, dtype=dtype, seed=seed)["block_trainability"]  # fmt: skip


def _trainability(outs, seen, channel_dim: int, seed: int) -> float:
    if len(outs) < 2:
        raise OptionError("block_trainability needs at least two blocks (a block's input "
                          "is the previous block's output)")  # fmt: skip
    g = torch.Generator(device=outs[0].device).manual_seed(seed)
    for f in outs:
        if not torch.isfinite(f).all():
            raise InputError("a block output is not finite")
    scores = [_pair_score(seen[i - 1], outs[i], channel_dim, g) for i in range(1, len(outs))]
    return float(sum(scores) / len(scores))


#: the metrics :func:`feature_metrics` computes (the registry's kind "features")
FEATURE_METRICS = ("feature_entropy", "block_trainability")


def feature_metrics(
    model: nn.Module,
    x: torch.Tensor,
    blocks: Sequence[nn.Module | str],
    names: Sequence[str],
    *,
    channel_dim: int = 1,
    bn: str = "eval",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """``{name: value}`` of :data:`FEATURE_METRICS` from one forward (with the backward
    per block pair that ``block_trainability`` needs); arguments as
    :func:`block_trainability`."""
    unknown = [m for m in names if m not in FEATURE_METRICS]
    if unknown:
        raise OptionError(f"unknown feature metrics {unknown}; known: {FEATURE_METRICS}")
    seed = _args.integer(seed, "seed", None)
    cut = "block_trainability" in names
    outs, seen = _block_outputs(model, x, blocks, channel_dim, bn, dtype, cut=cut)
    out = {}
    for m in names:
        if m == "feature_entropy":
            out[m] = float(sum(_entropy(f, channel_dim) for f in outs))
        else:
            out[m] = _trainability(outs, seen, channel_dim, seed)
    return out


def feature_entropy(
    model: nn.Module,
    x: torch.Tensor,
    blocks: Sequence[nn.Module | str],
    *,
    channel_dim: int = 1,
    bn: str = "eval",
    dtype: torch.dtype | None = None,
) -> float:
    """AZ-NAS's expressivity: the sum over ``blocks`` of :func:`block_entropies`.

    Higher is better (features that use more of their channels). NaN when a block's
    output is constant. Arguments as :func:`block_entropies`.
    """
    return feature_metrics(model, x, blocks, ["feature_entropy"], channel_dim=channel_dim,
                           bn=bn, dtype=dtype)["feature_entropy"]  # fmt: skip
