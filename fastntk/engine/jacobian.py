"""The torch.func Jacobian strategy (``method="vmap"``): each sample's Jacobian of the
passes' functions with ``vmap(jacrev)``, chunked over samples, and its Gram. The
whole-model fallback of the layerwise strategy takes the same Jacobians."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch.func import jacrev, vmap

from fastntk import _model
from fastntk.engine.call import Call
from fastntk.errors import CapturedMutationError, UntraceableError
from fastntk.profiling import count_gram, phase

# torch.func's messages (torch 2.4 to 2.13, aten/src/ATen/functorch) for a forward it cannot
# transform, each with the reason given to the user
_UNTRACEABLE = (
    ("data-dependent control flow", "its forward calls .item() or branches on a tensor's value"),
    ("calling .item() on a Tensor", "its forward calls .item() on a tensor"),
    ("Batching rule not implemented for", "an op of its forward has no batching rule"),
    ("does not yet have a batching rule", "an op of its forward has no batching rule"),
    ("that can output dynamic shape", "an op's output shape depends on the values"),
    ("that can support dynamic shape", "an op's output shape depends on the values"),
    ("doesn't have storage", "an op of its forward reads a tensor's memory directly"),
)


@contextlib.contextmanager
def torch_func(what: str) -> Iterator[None]:
    """torch.func's errors for a forward it cannot transform as typed errors naming ``what``
    was transformed: :class:`CapturedMutationError` (a tensor it does not own changed in
    place), :class:`UntraceableError` (control flow on values, ``.item()``, an op without
    a batching rule)."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if "mutate a captured Tensor" in text or "vmap: inplace arithmetic" in text:
            raise CapturedMutationError(
                f"torch.func cannot differentiate {what}: its forward changes a tensor in "
                "place that is not an input of the transformed function (a buffer updated in "
                "forward, e.g. a running average); fastntk.ntk with method='auto' or 'loop' "
                "computes this kernel through the batch graph"
            ) from e
        why = next((why for msg, why in _UNTRACEABLE if msg in text), None)
        if why is None:
            raise
        raise UntraceableError(
            f"torch.func cannot differentiate {what}: {why}, which its vmap cannot trace; "
            "fastntk.ntk with method='auto' or 'loop' computes this kernel through the batch "
            "graph (exact, without torch.func)"
        ) from e


def jacobians(call: Call, x: torch.Tensor, pnames: list[str]) -> dict[str, torch.Tensor]:
    """Per-sample Jacobians of the passes' functions: pname -> (n, npasses, P_p)."""
    copies, head = call.copies, call.head
    sel = {p: copies.params[p].detach() for p in pnames}
    rest = {k: v.detach() for k, v in copies.params.items() if k not in sel}
    xp = x.detach().to(call.dtype) if x.is_floating_point() else x
    y0 = head(copies.call(call.model, xp[:1], samples=_model.ALONE), 1)
    W = torch.stack(head.passes(y0))[:, 0]  # (npasses, K)

    def f(p, xi):
        with _model.forward_samples(_model.ALONE):
            state = ({**rest, **p}, copies.buffers)
            out = copies.functional(call.model, {**state[0], **state[1]}, (xi.unsqueeze(0),))
        return W @ head(out)[0]  # (npasses,)

    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    for s0 in range(0, xp.shape[0], call.samples):
        with torch_func("the model"):
            J = vmap(jacrev(f), in_dims=(None, 0))(sel, xp[s0 : s0 + call.samples])
        for p in pnames:
            out[p].append(J[p].reshape(J[p].shape[0], W.shape[0], -1))
    return {p: torch.cat(v) for p, v in out.items()}


def kernel(call: Call, x1: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
    """Θ(x1, x2) from the per-sample Jacobians of all selected parameters."""
    names = list(call.selected)
    with phase("jacobian"):
        J1 = jacobians(call, x1, names)
        J2 = J1 if x2 is None else jacobians(call, x2, names)
    n1, n2 = x1.shape[0], (x2 if x2 is not None else x1).shape[0]
    with phase("gram"):
        return contract(call, J1, J2, n1, n2)


def contract(call: Call, J1: dict, J2: dict, n1: int, n2: int) -> torch.Tensor:
    """The kernel of Jacobians ``J1`` (n1, npasses, cols) and ``J2`` (n2, ...) per parameter."""
    theta = None
    full = call.head.full
    for p in J1:
        A, B = J1[p], J2[p]  # (n, npasses, cols)
        if full:  # every pair of passes
            count_gram(A.shape[0] * A.shape[1], B.shape[0] * B.shape[1], A.shape[2])
            t = torch.einsum("iac,jbc->aibj", A, B)
            part = t.reshape(A.shape[1] * n1, B.shape[1] * n2)
        else:  # matching passes only
            count_gram(A.shape[0], B.shape[0], A.shape[1] * A.shape[2])
            part = torch.einsum("iac,jac->ij", A, B)
        theta = part if theta is None else theta + part
    return call.head.finish(theta, n1, n2, A.shape[1])  # ("full"/"mean": a pass per output)
