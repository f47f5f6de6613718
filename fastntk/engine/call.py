"""The state one ``ntk`` call shares between its strategies: the model, the private
copies, the output head, the selected parameters, the workspace and the plan."""

from __future__ import annotations

import torch
import torch.nn as nn

from fastntk import _model
from fastntk._model import Copies, Head
from fastntk.engine import options, plan
from fastntk.rules import Workspace


class Call:
    """One call's state under a plan (a strategy reads it; it decides nothing).

    Attributes:
        model: the user's model (its forwards run with ``copies``).
        selected: canonical name -> the user's parameter, of the parameters the kernel is of.
        head: the output head (raw output -> (N, K), the backward passes, the final form).
        copies: the call's private parameters and buffers, in ``dtype``.
        workspace: reusable buffers of the rules' per-sample gradient blocks.
        plan: the plan being run (replaced where a forward shows a fact it names).
    """

    def __init__(self, model: nn.Module, opts: options.Options, the_plan: plan.Plan):
        self.model = model
        self.selected = opts.selected
        self.head = Head(opts.output)
        self.bn = opts.bn
        self.dtype = opts.dtype
        self.progress = opts.progress
        self.device = next(iter(self.selected.values())).device
        self.copies: Copies = _model.make_copies(model, self.selected, self.dtype)
        self.workspace = Workspace()
        self.plan = the_plan

    @property
    def backend(self) -> str:
        return self.plan.backend

    @property
    def samples(self) -> int:
        return self.plan.samples

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` detached, in the call's dtype and requiring grad where floating point."""
        x = x.detach()
        if x.is_floating_point():
            x = x.to(self.dtype).requires_grad_(True)
        return x

    def alloc(self, n1: int, n2: int, R: int) -> torch.Tensor:
        """A zero (R·n1, R·n2) kernel accumulator."""
        return torch.zeros(R * n1, R * n2, dtype=self.dtype, device=self.device)
