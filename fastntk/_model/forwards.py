"""Forwards fastntk puts on module instances for the duration of a call, and what they
need: the per-sample BatchNorm (``bn="per_sample"``) with the count of samples the
running forward holds, PReLU by ``torch.where``, and the BatchNorm gradient-layout hook.
:func:`fastntk._model.state.model_state` installs and removes them."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from fastntk import rules as _rules
from fastntk._model.structure import batchnorms
from fastntk.errors import MergedSamplesError, OneValuePerChannelError, UnsupportedError
from fastntk.rules.norm import per_sample_batchnorm

# What the forward running now is made of, for bn="per_sample": the number of samples
# (a batch along dim 0: each of a BatchNorm's rows must be one of them), ALONE (one
# sample, all rows its own: a function vmapped over the samples, as vmap(jacrev) sees the
# model) or ROWS (each row normalised by itself, unchecked: the probe, which only measures
# shapes, and a rule re-running one module on its samples' rows; also the default).
ALONE, ROWS = "alone", "rows"
_FORWARD_SAMPLES: contextvars.ContextVar[int | str] = contextvars.ContextVar(
    "fastntk_forward_samples", default=ROWS
)


@contextlib.contextmanager
def forward_samples(n: int | str) -> Iterator[None]:
    token = _FORWARD_SAMPLES.set(n)
    try:
        yield
    finally:
        _FORWARD_SAMPLES.reset(token)


def _degenerate(self: nn.Module, x: torch.Tensor) -> UnsupportedError:
    return UnsupportedError(
        f"bn='per_sample': a {type(self).__name__} gets one value per channel per sample "
        f"(input {tuple(x.shape)} for one sample), which its own statistics normalise to 0 "
        "whatever the input, so nothing before it reaches the kernel (PyTorch refuses a "
        "train-mode BatchNorm on one such sample); use bn='eval' (running statistics) or "
        "bn='batch'"
    )


def per_sample_bn_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    n = _FORWARD_SAMPLES.get()
    if n == ALONE:  # one sample: its statistics over all its rows and positions
        if x.numel() <= x.shape[1]:
            raise _degenerate(self, x)
        return per_sample_batchnorm(self, x, rows_are_samples=False, affine=True)
    if n == ROWS or x.shape[0] == n:
        if n != ROWS and x[0].numel() <= x.shape[1]:
            raise OneValuePerChannelError(self, tuple(x.shape))
        return per_sample_batchnorm(self, x, affine=True)
    raise MergedSamplesError(
        f"a {type(self).__name__} is given {x.shape[0]} rows for {n} samples (samples "
        "merged with another dim, e.g. (N*T, C) frames, or no sample dim), and a batched "
        "forward cannot tell which rows are one sample's"
    )


@contextlib.contextmanager
def _input_shapes(mods: list[nn.Module]) -> Iterator[list[tuple[int, ...]]]:
    """The first input's shape of every call of ``mods`` made inside the block."""
    seen: list[tuple[int, ...]] = []
    hs = [m.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape))) for m in mods]
    try:
        yield seen
    finally:
        for h in hs:
            h.remove()


@contextlib.contextmanager
def bn_rows_checked(model: nn.Module, copies: Any, x: torch.Tensor, bn: str) -> Iterator[None]:
    """Around a batched forward of ``x`` (the batch graph's, which has no probe): with
    bn="per_sample", refuse BatchNorms whose rows are not the samples. A row count that
    differs from the samples' is caught by the BatchNorm's forward; one that equals it by
    chance (T = N time steps as rows) is caught here, against a forward of one sample:
    each call's dim 0 must hold n rows in the batch and one alone."""
    mods = batchnorms(model) if bn == "per_sample" and x.shape[0] > 1 else []
    if not mods:
        yield
        return
    try:
        with torch.no_grad(), _input_shapes(mods) as alone:
            copies.call(model, x[-1:], samples=ROWS)
    except Exception:  # noqa: BLE001 - a model that cannot run one sample: unchecked
        alone = None
    with _input_shapes(mods) as batch:
        yield
    if alone is None:
        return
    if len(alone) != len(batch) or any(
        b[0] != x.shape[0] or a[0] != 1 or a[1:] != b[1:] for a, b in zip(alone, batch, strict=True)
    ):
        raise MergedSamplesError(
            "a BatchNorm of this model is given rows that are not its samples (time steps, "
            "or no sample dim)"
        )


def prelu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``F.prelu(x, weight)`` by ``torch.where``: torch.func's vmap(jacrev) over
    ``F.prelu`` gives wrong Jacobians in torch 2.13 (against per-sample jacrev; or a size
    error: tests/test_engine_edge_cases.py); the same function and gradients (x > 0: 1,
    else the weight, as ``prelu``'s backward) through ops it batches right."""
    w = self.weight
    if w.numel() > 1 and x.dim() >= 2:
        w = w.view((1, -1) + (1,) * (x.dim() - 2))
    elif w.numel() == 1:
        w = w.reshape(())
    return torch.where(x > 0, x, w * x)


_rules.OWN_FORWARDS.update({per_sample_bn_forward, prelu_forward})

# BatchNorm forwards bn="per_sample" replaces by per-sample statistics: torch's own
# (SyncBatchNorm's adds only the cross-process reduction of the batch statistics).
BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def bn_gradient_layout(module: nn.Module, args: Any, out: Any) -> None:
    """PyTorch's CPU BatchNorm backward (2.11 and 2.13) returns a wrong input gradient for
    a batch of one sample when the output gradient arrives in another memory layout than
    the output (channels-last strides, from a ``flatten(2).transpose(1, 2)`` downstream):
    a per-sample backward or a one-sample chunk gave wrong kernels (the conv model of
    ``tests/test_engine_edge_cases.py::test_one_sample_batchnorm_backward_with_channels_last_gradients``).
    The gradient is handed on in the output's own layout."""
    if not (isinstance(out, torch.Tensor) and out.grad_fn is not None and out.shape[0] == 1):
        return
    if torch._C._functorch.is_functorch_wrapped_tensor(out):
        return  # torch.func (vmap, grad) never runs the native backward this way
    fmt = (torch.channels_last if out.dim() == 4 and not out.is_contiguous()
           and out.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)  # fmt: skip

    def prehook(grad_outputs):
        g = grad_outputs[0]
        if g is None or g.is_contiguous(memory_format=fmt):
            return None
        return (g.contiguous(memory_format=fmt), *grad_outputs[1:])

    out.grad_fn.register_prehook(prehook)
