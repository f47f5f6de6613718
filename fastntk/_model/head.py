"""The output head: the model's raw output reduced to the (N, K) matrix the kernel is of,
the backward passes (output weightings) that define it, and the kernel's final form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastntk.errors import InputError, OptionError


@dataclass(frozen=True)
class Head:
    """Reduction of the model's raw output to the (n, K) matrix the kernel is built from.

    ``passes`` lists the output weightings that define per-sample scalar
    functions: the kernel of pass ``w`` is the NTK of ``sum_k w_k f_k(x)``.
    ``"sum"``: one pass of ones; an int: one one-hot pass; ``"trace"``,
    ``"mean"``, ``"full"``: one pass per logit (``"full"`` keeps the cross
    terms between passes). K, the outputs per sample, is not the head's: a forward
    shows it (``y.shape[1]``), and what needs it takes it as an argument.
    """

    output: Any

    def __call__(self, raw: Any, n: int | None = None) -> torch.Tensor:
        """The (N, K) outputs the kernel is of; ``n``: the batch size they must have."""
        y = self._select(raw)
        if n is not None and y.shape[0] != n:
            what = "the output callable" if callable(self.output) and not isinstance(
                self.output, (str, int)) else "the model"  # fmt: skip
            raise InputError(
                f"{what} returned {y.shape[0]} rows for a batch of {n} samples; the kernel "
                "needs one output row per sample (the batch in dim 0)"
            )
        return y

    def _select(self, raw: Any) -> torch.Tensor:
        if callable(self.output) and not isinstance(self.output, (str, int)):
            y = self.output(raw)
            if not isinstance(y, torch.Tensor):
                raise OptionError("the output callable must return a tensor")
            if y.dim() == 2 and y.shape[1] == 1:
                y = y[:, 0]
            if y.dim() != 1:
                raise OptionError(
                    f"the output callable must return one value per sample, shape (N,), got "
                    f"{tuple(y.shape)}; use output='sum'/'trace'/'full' for vector outputs"
                )
            return y.unsqueeze(1)
        if isinstance(raw, (tuple, list)):
            raw = raw[-1]  # e.g. NAS-Bench-201's (features, logits)
        elif isinstance(raw, dict):
            raise OptionError(
                "the model returns a dict; pass output=lambda out: out['logits'].sum(1) "
                "(a callable giving one value per sample)"
            )
        if not isinstance(raw, torch.Tensor):
            raise OptionError(
                f"the model returned {type(raw)}; expected a tensor or a tuple of them"
            )
        y = raw.reshape(raw.shape[0], -1) if raw.dim() > 1 else raw.unsqueeze(1)
        if isinstance(self.output, int):
            if not -y.shape[1] <= self.output < y.shape[1]:
                raise OptionError(
                    f"output={self.output} is out of range: the model has {y.shape[1]} outputs"
                )
            return y[:, self.output : self.output + 1] if self.output != -1 else y[:, -1:]
        return y

    @property
    def one_pass(self) -> bool:
        """One backward pass per chunk ("sum", an int, a callable), else K of them."""
        return self.output == "sum" or callable(self.output) or isinstance(self.output, int)

    def passes(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The (n, K) output weightings of the backward passes of outputs ``y`` (n, K)."""
        n, K = y.shape
        if self.one_pass:
            return [torch.ones_like(y)]
        eye = torch.eye(K, dtype=y.dtype, device=y.device)
        return [eye[k].expand(n, K) for k in range(K)]

    @property
    def full(self) -> bool:
        return self.output == "full"

    def rows(self, K: int) -> int:
        """Rows per sample in the kernel of a model with K outputs: K for "full", else 1."""
        return K if self.full else 1

    def finish(self, theta: torch.Tensor, n1: int, n2: int, K: int) -> torch.Tensor:
        """(R*n1, R*n2) accumulator of a model with K outputs -> the kernel the user asked
        for (K is read for "full" and "mean", whose passes are the K outputs)."""
        if self.full:
            return theta.view(K, n1, K, n2).permute(1, 3, 0, 2).contiguous()
        if self.output == "mean":
            theta = theta / K
        return theta
