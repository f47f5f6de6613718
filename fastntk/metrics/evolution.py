"""Kernel evolution (LGA paper §4.1, §4.3): how a model's NTK on a probe batch changes
while a copy of the model trains with the paper's recipe.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastntk import _args, _model
from fastntk.errors import InputError, OptionError
from fastntk.metrics.checks import check_batch, check_labels
from fastntk.metrics.kernel import kernel_correlation, lga, relative_kernel_difference
from fastntk.metrics.model_kernels import kernel_of, ntk_kwargs

__all__ = ["KernelEvolution", "kernel_evolution"]


@dataclass
class KernelEvolution:
    """Kernels and metrics of a model trained for ``times`` steps or epochs.

    Attributes:
        times: sorted times (0 first), in ``unit``.
        unit: ``"step"`` or ``"epoch"``.
        kernels: Θ_t(x, x) for each time, float64 CPU (N, N).
        lga: LGA_t (Eq. 12) for each time.
        kernel_correlation: Pearson(Θ_0, Θ_t) for each time (1 at t = 0).
        relative_difference: ‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F for each time (0 at t = 0).
        train_loss: mean training loss over the step/epoch just before each time
            (NaN at t = 0: no training yet).
    """

    times: list[int]
    unit: str
    kernels: list[torch.Tensor] = field(repr=False)
    lga: list[float]
    kernel_correlation: list[float]
    relative_difference: list[float]
    train_loss: list[float]


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[-1]
    return out


# kernel_evolution seeds torch's process-wide generator for its copy's dropout (inside
# fork_rng): two calls at once would restore each other's state; they take turns.
_RNG_LOCK = threading.Lock()


@_model.with_grad
def kernel_evolution(
    model: nn.Module,
    x: torch.Tensor,
    y: Any,
    *,
    times: Sequence[int] = (0, 1),
    unit: str = "epoch",
    train_x: torch.Tensor | None = None,
    train_y: Any = None,
    batch_size: int = 1024,
    lr: float = 0.025,
    momentum: float = 0.9,
    weight_decay: float = 3e-4,
    seed: int = 0,
    bn: str = "eval",
    params: Any = None,
    output: Any = "sum",
    dtype: Any = None,
    chunk_size: int | None = None,
) -> KernelEvolution:
    """Train a deep copy of ``model`` and track its NTK on a probe batch (LGA paper §4).

    Recipe (LGA paper appendix, Section 4.3): SGD, ``lr 0.025``, momentum 0.9, weight
    decay 3e-4, cross-entropy on the logits (last element of a tuple output), minibatches
    of ``batch_size`` (1024 in the paper) from ``(train_x, train_y)`` (default: the probe
    batch itself), reshuffled each epoch by a CPU generator seeded with ``seed``; the
    global RNG (dropout, ...) is seeded with ``seed`` inside ``torch.random.fork_rng`` so
    the caller's RNG state is untouched (calls take turns on it; a draw from another
    thread while a call trains still moves the shared generator, and the copy's dropout
    with it). The copy trains in train mode; each kernel is
    computed on the copy with ``bn`` (eval mode then uses the copy's updated running
    statistics, as the paper's Eval-mode BN after training).

    Args:
        x, y: probe batch (N, ...) and its labels (N,), where the NTK is measured.
        times: non-negative step/epoch counts at which to measure; 0 is always added.
        unit: ``"step"`` (one SGD update on one minibatch) or ``"epoch"`` (one pass over
            the training data, the last partial minibatch kept).

    Returns:
        :class:`KernelEvolution`. The user's model (parameters, buffers, gradients,
        training flag) is not changed.
    """
    _model.check_model(model)
    x = _model.plain(check_batch(x, "x"))
    yt = check_labels(y, x.shape[0], "y")
    if unit not in ("step", "epoch"):
        raise OptionError(f"unit must be 'step' or 'epoch', got {unit!r}")
    if isinstance(times, (str, bytes)) or not isinstance(times, Iterable):
        raise OptionError(f"times must be a sequence of non-negative integers, got {times!r}")
    ts = sorted({0, *(_args.integer(t, "each of times", 0) for t in times)})
    batch_size = _args.integer(batch_size, "batch_size", 1)
    lr = _args.real(lr, "lr", strict=True)
    momentum = _args.real(momentum, "momentum")
    weight_decay = _args.real(weight_decay, "weight_decay")
    if train_x is None:
        tx, ty = x, yt
    else:
        tx = _model.plain(check_batch(train_x, "train_x"))
        ty = check_labels(train_y, tx.shape[0], "train_y")
    kw = ntk_kwargs(bn, params, output, dtype, chunk_size)
    if int(ty.min()) < 0:
        raise InputError(f"class labels must be >= 0, got {int(ty.min())}")

    seed = _args.integer(seed, "seed", -(2**63), 2**64)  # (what torch.manual_seed takes)
    with _model.locked(model):  # not a copy of another call's temporary modes and forwards
        net = copy.deepcopy(model)
    for p in net.parameters():
        p.grad = None
    for m in net.modules():  # the user's backward hooks stay with the user's model (as ntk)
        _model.clear_backward_hooks(m)
    try:
        dev = next(net.parameters()).device
    except StopIteration as e:
        raise InputError("model has no parameters") from e
    tx_d = tx.to(dev)
    ty_d = ty.to(dev)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n_train = tx.shape[0]

    def _batches():
        while True:
            perm = torch.randperm(n_train, generator=gen)
            for s in range(0, n_train, batch_size):
                yield perm[s : s + batch_size]

    def _epoch_len() -> int:
        return math.ceil(n_train / batch_size)

    kernels: list[torch.Tensor] = []
    losses: list[float] = []
    batches = _batches()
    done = 0  # steps or epochs done
    # the copy's RNG draws (dropout) on its own device's generator, saved and restored
    # with the CPU's; torch.manual_seed would reseed every GPU's generator for good
    cuda = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if (dev.type == "cuda")
        else []
    )
    with _RNG_LOCK, torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for i in cuda:
            with torch.cuda.device(i):
                torch.cuda.manual_seed(seed)
        for t in ts:
            last: list[float] = []
            while done < t:
                n_steps = 1 if unit == "step" else _epoch_len()
                last = []
                net.train()
                for _ in range(n_steps):
                    idx = next(batches).to(dev)
                    opt.zero_grad(set_to_none=True)
                    logits = _logits(net(tx_d[idx]))
                    if int(ty_d[idx].max()) >= logits.shape[-1]:
                        raise InputError(
                            f"label {int(ty_d[idx].max())} is out of range for the model's "
                            f"{logits.shape[-1]} logits (cross-entropy training)"
                        )
                    loss = F.cross_entropy(logits, ty_d[idx])
                    loss.backward()
                    opt.step()
                    last.append(float(loss.detach()))
                done += 1
            opt.zero_grad(set_to_none=True)
            net.train(model.training)  # measure in the user's mode, as compute_metrics does
            losses.append(float(np.mean(last)) if last else float("nan"))
            kernels.append(kernel_of(net, x, kw).double())
    K0 = kernels[0]
    return KernelEvolution(
        times=ts,
        unit=unit,
        kernels=kernels,
        lga=[lga(K, yt) for K in kernels],
        kernel_correlation=[kernel_correlation(K0, K) for K in kernels],
        relative_difference=[relative_kernel_difference(K0, K) for K in kernels],
        train_loss=losses,
    )
