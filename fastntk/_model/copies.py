"""Private copies of the parameters and buffers every forward of a call runs with.

The engine never runs the user's parameters or buffers: every forward goes through
``torch.func.functional_call`` with private copies (their own storage, cast to the
computation dtype, ``requires_grad`` set only on the selected ones; so a train-mode
BatchNorm updates the copy, not the user's running statistics, and a forward editing a
weight in place edits the copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from fastntk._model.forwards import forward_samples


@dataclass
class Copies:
    """Private parameters and buffers the forward runs with."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    # module id -> its (module.attribute slot, canonical name) pairs, made once per call:
    # the structure cannot change while the copies live (one ntk call)
    _slots: dict[int, list[tuple[str, str]]] = field(default_factory=dict, repr=False)

    def call(
        self, model: nn.Module, x: torch.Tensor, *, samples: int | str | None = None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> Any:  # fmt: skip
        """``model(x)`` with the copies; ``samples``, what ``x`` holds for bn="per_sample"
        (:func:`forward_samples`), is by default a sample per row of dim 0; ``params``
        replace some of the copies for this call (the operator's dual tensors)."""
        with forward_samples(x.shape[0] if samples is None else samples):
            tensors = {**self.params, **(params or {}), **self.buffers}
            return self.functional(model, tensors, (x,))

    def functional(
        self, module: nn.Module, tensors: dict[str, torch.Tensor], args: Any,
        kwargs: dict | None = None,
    ) -> Any:  # fmt: skip
        """``module(*args, **kwargs)`` with ``tensors`` (by canonical name, as
        ``named_parameters()`` / ``named_buffers()`` give them) in place of its own.

        Every (module, attribute) slot is swapped exactly once: a parameter tied to several
        modules reaches each of them, and a submodule registered under two names (a
        ``ModuleList([blk, blk])``) is swapped once. torch.func's ``tie_weights=True``
        swapped such an aliased slot twice and restored it to the copy, so a plain call
        left fastntk's private tensors in the user's model.
        """
        if id(module) not in self._slots:
            self._slots[id(module)] = _slot_names(module)
        slots, used = {}, set()
        for slot, name in self._slots[id(module)]:
            if name in tensors:
                slots[slot] = tensors[name]
                used.add(name)
        slots.update({n: t for n, t in tensors.items() if n not in used})  # torch.func judges
        return functional_call(module, slots, args, kwargs, tie_weights=False)


def _slot_names(module: nn.Module) -> list[tuple[str, str]]:
    """``(slot, canonical name)`` for every (module, attribute) slot of ``module`` that
    holds a parameter or buffer, each slot once (an aliased submodule under one name)."""
    canon = {id(t): n for n, t in module.named_parameters()}
    canon.update({id(t): n for n, t in module.named_buffers()})
    out: list[tuple[str, str]] = []
    seen: set[tuple[int, str]] = set()
    for mname, mod in module.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for attr, t in store.items():
                if t is None or (id(mod), attr) in seen or id(t) not in canon:
                    continue
                seen.add((id(mod), attr))
                out.append((f"{mname}.{attr}" if mname else attr, canon[id(t)]))
    return out


def make_copies(model: nn.Module, selected: dict[str, nn.Parameter], dtype: torch.dtype) -> Copies:
    params = {}
    for n, p in model.named_parameters():
        t = p.detach()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        else:  # own storage: a forward that edits a parameter in place (a clamp_ under
            t = t.clone()  # no_grad) edits this copy, not the user's parameter
        params[n] = t.requires_grad_(n in selected)
    buffers = {}
    for n, b in model.named_buffers():
        t = b.detach().clone()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        buffers[n] = t
    return Copies(params, buffers)
