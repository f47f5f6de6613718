"""What a model is made of, as the engine reads it: the owners of each parameter, its
BatchNorms, its recurrent modules, and whether its samples interact in the forward."""

from __future__ import annotations

import torch.nn as nn


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recurrent(model: nn.Module) -> str | None:
    """Name of the model's first recurrent module (``nn.RNN``/``GRU``/``LSTM`` or a cell).

    Their fused kernels have no torch.func batching rule (vmap over them fails; a cell
    called without a state makes its zero state inside, which vmap cannot batch), and no
    per-layer rule covers them: the kernel of such a model is taken through the batch
    graph (one backward per sample and pass), exact but without the layerwise speed-up.
    """
    for name, m in model.named_modules():
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            return f"{name or 'the model'} ({type(m).__name__})"
    return None


def is_coupled(model: nn.Module, bn: str) -> bool:
    """Whether samples interact in the forward pass (per-sample factorisation invalid)."""
    if bn == "batch":
        return bool(batchnorms(model))
    if bn == "eval":
        # BatchNorm without running statistics uses batch statistics even in eval mode.
        return any(m.running_mean is None for m in batchnorms(model))
    return False


# One call at a time per module (two threads computing kernels of one model, or of two
# models sharing a block, would each save the other's temporary modes, hook dicts and
# private parameter copies as the user's): a call takes the locks of all its modules, in


def owners(model: nn.Module) -> dict[str, list[tuple[str, nn.Module, str]]]:
    """canonical param name -> [(module name, module, attribute)] for every registration."""
    named = dict(model.named_parameters())
    canon = {id(p): n for n, p in named.items()}
    out: dict[str, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is not None and id(p) in canon:
                entry = (mname, m, attr)
                lst = out.setdefault(canon[id(p)], [])
                if all(e[1] is not m or e[2] != attr for e in lst):
                    lst.append(entry)
    return out
