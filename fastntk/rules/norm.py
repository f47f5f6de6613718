"""Gram rules of the affine parameters of normalisation layers.

Derivation. Every normalisation layer computes ``y = gamma * xhat + beta``
with ``xhat`` the normalised input and ``gamma``/``beta`` broadcast along the
channel (BatchNorm, GroupNorm, InstanceNorm: dim 1) or over the trailing
``normalized_shape`` (LayerNorm). With ``g = df_i/dy``:

    dgamma_i = sum over the other positions of g * xhat
    dbeta_i  = sum over the other positions of g

``xhat`` does not depend on gamma/beta, so it is recomputed from the saved
input with the layer's own statistics:

* BatchNorm, ``bn="eval"``: running statistics (the layer is a per-channel
  affine map); ``bn="per_sample"``: the statistics of each sample alone
  (mean and biased variance over its spatial positions). ``bn="batch"``
  couples samples and never reaches a rule (see the engine).
* GroupNorm, LayerNorm: per-sample statistics by construction.
* InstanceNorm: per-sample statistics, or the running ones when it tracks
  them and runs in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastntk.rules import Dense, GramRule, register_gram_rule, same_data


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    """(n, C, ...) -> (n, C): sum over everything after the channel dim."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(2)


def per_sample_batchnorm(
    module: nn.Module, x: torch.Tensor, rows_are_samples: bool = True, affine: bool = False
) -> torch.Tensor:
    """Normalise each sample by its own per-channel statistics; with ``affine``, then scale
    and shift by ``module``'s weight and bias (where it has them), in the normalising
    kernel where ``x`` has positions.

    ``x`` is (rows, C, ...): each row one sample (statistics over its positions), or
    with ``rows_are_samples=False`` all rows one sample's (statistics over the rows and
    positions: a train-mode BatchNorm on that sample alone).
    """
    w, b = (module.weight, module.bias) if affine else (None, None)
    if not rows_are_samples:  # a train-mode BatchNorm of that one sample
        return F.batch_norm(x, None, None, w, b, training=True, eps=module.eps)
    if x.dim() <= 2:  # (n, C): one value per row and channel, so xhat = 0 (the graph kept:
        y = x - x  # the backward still reaches the layers before; bn="per_sample" refuses it)
        return y if w is None else y * w + b
    # each sample's channel over its positions: a GroupNorm with one group per channel,
    # forward and backward 0.39 ms against 7.9 ms by the mean, torch.var (Welford's one
    # pass on the CPU) and elementwise ops, (64, 16, 32, 32) float32 (`python
    # bench/bench_engine_choices.py per_sample_bn`: bench/results/engine_choices_cpu.md)
    return F.group_norm(x, x.shape[1], w, b, module.eps)


def _sample_channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/sqrt(var + eps)) of each sample's channels over their positions, both (n, C),
    for an (n, C, ...) ``x`` with positions. Two passes (the mean, then the mean of the
    squared deviations, the textbook two-pass variance): 0.17 ms against 2.9 ms for
    ``torch.var``, (64, 16, 32, 32) float32 (``python bench/bench_engine_choices.py
    per_sample_bn``)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    mean = flat.mean(2, keepdim=True)
    dev = flat - mean
    return mean[..., 0], torch.rsqrt((dev * dev).mean(2) + eps)


class _ChannelAffineRule(GramRule):
    param_names = ("weight", "bias")
    supports_rows = True

    def xhat(self, module, x, bn, stats):
        raise NotImplementedError

    def save(self, module, args, kwargs, output, ctx):
        # The running statistics are read now: during the forward they are the
        # engine's copies in the computation dtype, afterwards the user's again.
        stats = (getattr(module, "running_mean", None), getattr(module, "running_var", None))
        return _Saved(args[0], ctx.bn, stats, ctx)

    def grad_rows(self, module, saved, gout, name, r0, r1):
        x, bn, stats = saved.x, saved.bn, saved.stats
        g = gout[:, r0:r1]
        if name == "bias":
            return Dense(_channel_sums(g))
        xh = self.xhat(module, x, bn, stats)[:, r0:r1]
        return Dense(_channel_sums(g * xh))


class _Saved:
    """What a channel-affine rule keeps of one call (the input, by reference)."""

    __slots__ = ("x", "bn", "stats", "ctx", "memo")

    def __init__(self, x, bn, stats, ctx):
        self.x, self.bn, self.stats, self.ctx = x, bn, stats, ctx
        # (name, id(output gradient)) -> (output gradient, (r0, r1), block): the other
        # parameter's block of a fused computation, handed out when it is asked for
        self.memo: dict = {}


def _fused_applies(x: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "csrc") or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous():
        return False
    from fastntk import _ext

    return _ext.available()


@register_gram_rule(nn.modules.batchnorm._BatchNorm)
class BatchNormRule(_ChannelAffineRule):
    def covers(self, module):
        # Without running statistics, eval-mode BatchNorm normalises with the
        # batch's statistics and couples samples: the engine routes such
        # models to the exact coupled path instead.
        return module.running_mean is not None

    def grad_rows(self, module, saved, gout, name, r0, r1):
        return self.grad_rows_multi(module, saved, [gout], name, r0, r1)[0]

    def grad_rows_multi(self, module, saved, gouts, name, r0, r1):
        x, bn, stats = saved.x, saved.bn, saved.stats
        if _fused_applies(x, saved.ctx.backend):
            return [self._fused(module, saved, g, name, r0, r1) for g in gouts]
        if name == "bias" or bn == "per_sample":
            base = super().grad_rows  # (zero-argument super does not work in a comprehension)
            return [base(module, saved, g, name, r0, r1) for g in gouts]
        # eval: sum_t g * (x - mean) * inv = inv * sum_t g * (x - mean); the scale is
        # applied after the reduction (one elementwise pass fewer than forming xhat),
        # only on the rows asked for, and the centred input is formed once for all
        # output gradients (several logits in "trace").
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xc = x[:, r0:r1] - stats[0][r0:r1].view(shape)
        inv = torch.rsqrt(stats[1][r0:r1] + module.eps)
        return [Dense(_channel_sums(g[:, r0:r1] * xc) * inv) for g in gouts]

    def _fused(self, module, saved, g, name, r0, r1):
        """Both parameters' blocks from one pass of the C++ op over (x, g): the weight's
        ``inv * sum g (x - mean)`` and the bias's ``sum g``; the one not asked for is kept
        for the next request when the kernel needs it too. NB201 shapes at N=128, weight
        and bias of one layer: 16x32x32 0.79 ms in PyTorch ops vs 0.38 ms fused, 64x8x8
        0.13 vs 0.11 ms (2-core CPU; python bench/bench_engine_choices.py affine,
        bench/results/engine_choices_cpu.md)."""
        hit = saved.memo.pop((name, id(g)), None)
        if hit is not None and hit[0] is g and hit[1] == (r0, r1):
            return hit[2]
        from fastntk import _ext

        x = saved.x
        if saved.bn == "per_sample":
            if x.dim() > 2:
                mean, inv = _sample_channel_stats(x, module.eps)
            else:  # one value per sample and channel: xhat = 0
                mean, inv = x, torch.zeros_like(x)
        else:
            mean = saved.stats[0]
            inv = torch.rsqrt(saved.stats[1] + module.eps)
        sgx, sg = _ext.affine_psg(x, g, mean)
        blocks = {"weight": Dense((sgx * inv)[:, r0:r1]), "bias": Dense(sg[:, r0:r1])}
        other = "bias" if name == "weight" else "weight"
        if other in saved.ctx.params:
            saved.memo[(other, id(g))] = (g, (r0, r1), blocks[other])
        return blocks[name]

    def xhat(self, module, x, bn, stats):
        if bn == "per_sample":
            return per_sample_batchnorm(module, x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = stats[0].view(shape)
        inv = torch.rsqrt(stats[1].view(shape) + module.eps)
        return (x - mean) * inv


@register_gram_rule(nn.GroupNorm)
class GroupNormRule(_ChannelAffineRule):
    def xhat(self, module, x, bn, stats):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


@register_gram_rule(nn.modules.instancenorm._InstanceNorm)
class InstanceNormRule(_ChannelAffineRule):
    def xhat(self, module, x, bn, stats):
        use_running = module.track_running_stats and not module.training
        return F.instance_norm(
            x,
            stats[0] if use_running else None,
            stats[1] if use_running else None,
            None,
            None,
            not use_running,
            0.0,
            module.eps,
        )


@register_gram_rule(nn.LayerNorm)
class LayerNormRule(GramRule):
    param_names = ("weight", "bias")
    supports_rows = True

    def save(self, module, args, kwargs, output, ctx):
        """(x, mean, 1/std) with the forward's own statistics where the output is the
        LayerNorm node of ``x`` (what autograd saved for its backward), else (x, None, None).
        The weight's block from the saved statistics (``(x - mean) * rstd * gout`` in one
        temporary, then the sum) took 0.09-0.13 ms against 0.70-2.6 ms with ``xhat``
        recomputed by ``F.layer_norm`` at (64, 256, 32) float32, 0.47-0.60 against
        8.4-10.3 ms at (64, 197, 192), three runs (``python bench/bench_engine_choices.py
        layer_norm``, bench/results/engine_choices_cpu.md)."""
        x = args[0]  # (detached by the engine: the node's input is the same tensor's data)
        node = getattr(output, "grad_fn", None)
        if (
            node is not None
            and node.name() == "NativeLayerNormBackward0"
            and tuple(node._saved_normalized_shape) == tuple(module.normalized_shape)
            and same_data(node._saved_input, x)
        ):
            return x, node._saved_result1, node._saved_result2
        return x, None, None

    def grad_rows(self, module, saved, gout, name, r0, r1):
        x, mean, rstd = saved
        n = gout.shape[0]
        nshape = module.normalized_shape
        k = len(nshape)
        if name == "bias":
            t = gout
        elif mean is None:
            t = gout * F.layer_norm(x, nshape, None, None, module.eps)
        else:  # xhat * gout in one temporary (float32 for a half x: cast below)
            t = (x - mean).mul_(rstd).mul_(gout)
        # sum over the positions between the batch dim and normalized_shape
        t = t.reshape(n, -1, *nshape).sum(1)  # (n, *nshape)
        t = t[:, r0:r1] if k else t
        return Dense(t.reshape(n, -1).to(gout.dtype))
