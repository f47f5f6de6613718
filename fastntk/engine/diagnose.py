"""Why a kernel is not finite: the first layer, in forward order, whose gradients are not."""

from __future__ import annotations

import math

import torch

from fastntk import _model
from fastntk.engine import graph
from fastntk.engine.call import Call


def nonfinite(call: Call, x1: torch.Tensor, x2: torch.Tensor | None) -> str:
    """Name the first layer, in forward order, whose gradients are not finite.

    Forward order: the order in which the forward used the parameters (the creation
    order of the autograd nodes that take each parameter, its first use), whatever
    the order in which the model declares them. A NaN or Inf born in the backward
    reaches every layer before it, so this names the earliest of those layers, not
    the one nearest to where the NaN appears.
    """
    owners = call.plan.owners
    for x in (x1, x2):
        if x is None:
            continue
        xp = x.detach().to(call.dtype) if x.is_floating_point() else x
        try:
            y = call.head(call.copies.call(call.model, xp))
        except _model.MergedSamplesError:  # bn="per_sample" on merged samples: no
            return (  # batched forward to diagnose with (the kernel came from vmap)
                "the kernel is not finite (NaN/Inf); compute it with "
                "dtype=torch.float64, or check the inputs and the model's initialisation"
            )
        if not bool(torch.isfinite(y).all()):
            return (
                "the model's output is not finite (NaN/Inf) for some inputs, so the kernel "
                "is not either; check the inputs and the model's initialisation"
            )
        w = call.head.passes(y)
        names = list(call.selected)
        tensors = [call.copies.params[p] for p in names]
        first_use = {  # autograd numbers its nodes in the order the forward makes them
            p: min(node._sequence_nr() for node, _ in uses)
            for p, uses in graph.param_consumers(y, dict(zip(names, tensors, strict=True))).items()
        }
        bad: set[str] = set()
        for k, wk in enumerate(w):
            gs = torch.autograd.grad(
                y, tensors, grad_outputs=wk, retain_graph=k < len(w) - 1, allow_unused=True
            )
            for pname, g in zip(names, gs, strict=True):
                if g is not None and not bool(torch.isfinite(g).all()):
                    bad.add(pname)
        if bad:
            pname = min(bad, key=lambda p: (first_use.get(p, math.inf), names.index(p)))
            mod = owners[pname][0][0] or "<root>"
            return (
                f"the contribution of layer {mod!r} (parameter {pname!r}) is not "
                "finite: its gradients contain NaN/Inf"
            )
    return (
        f"the kernel overflowed in {call.dtype} although every layer's gradients are "
        "finite; compute it with dtype=torch.float64"
    )
