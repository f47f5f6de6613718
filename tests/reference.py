"""The one oracle every fastntk path is held against.

A float64 ``torch.func.jacrev`` of the whole batch function, written
independently of the engine: it copies the model (``deepcopy(...).double()``)
and sets the BatchNorm semantics by plain module modes, so it shares no code
with fastntk.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call, jacrev

# Relative error (rel_err) allowed against the oracle: one table for the whole suite.
# float64: every path reaches about 1e-15 (largest measured 1.6e-14, test_engine.py's
# BatchNorm modes); 1e-10 keeps a wide margin and still sees a Gram rounded through
# float32 inside a float64 call (about 4e-8, which 1e-6 let pass:
# test_engine.py::test_float32_gram_inside_float64_call_is_caught). float32: largest
# measured 3.5e-7.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _select(model, params):
    named = dict(model.named_parameters())
    if params is None:
        return [n for n, p in named.items() if p.requires_grad]
    if callable(params):
        return [n for n, p in named.items() if params(n, p)]
    aliases = dict(model.named_parameters(remove_duplicate=False))
    canon = {id(p): n for n, p in named.items()}
    return list(dict.fromkeys(canon[id(aliases[n])] for n in params))


def _logits(out):
    if isinstance(out, (tuple, list)):
        out = out[-1]
    return out.reshape(out.shape[0], -1)


def jacobian(model: nn.Module, x: torch.Tensor, bn: str, params=None) -> torch.Tensor:
    """(N, K, P) float64 Jacobian of the logits w.r.t. the selected parameters.

    ``bn="eval"``: eval mode; ``"batch"``: BatchNorm in train mode over the
    whole batch (coupled); ``"per_sample"``: each sample alone through a
    train-mode BatchNorm (its own statistics).
    """
    m = copy.deepcopy(model).double().eval()
    if bn in ("batch", "per_sample"):
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.train()
                mod.track_running_stats = False  # batch statistics, no in-place stat updates
    names = _select(model, params)
    all_p = {n: p.detach() for n, p in m.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in m.named_buffers()}
    xd = x.double() if x.is_floating_point() else x

    def f(sel, xb):
        out = functional_call(m, ({**all_p, **sel}, bufs), (xb,))
        return _logits(out)

    sel = {n: all_p[n] for n in names}
    if bn == "per_sample":
        rows = [_flat(jacrev(f)(sel, xd[i : i + 1]), names) for i in range(xd.shape[0])]
        return torch.cat(rows)
    return _flat(jacrev(f)(sel, xd), names)


def _flat(J: dict, names) -> torch.Tensor:
    parts = [J[n].reshape(J[n].shape[0], J[n].shape[1], -1) for n in names]
    return torch.cat(parts, 2)


def _batch_statistics(model, bn) -> bool:
    """Whether a BatchNorm normalises by the statistics of the batch it is given: all of
    them for bn="batch", those without running statistics (which use the batch's in eval
    mode too) for bn="eval"."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn == "batch":
        return bool(bns)
    return bn == "eval" and any(m.running_mean is None for m in bns)


def full_kernel(model, x1, x2=None, bn="eval", params=None) -> torch.Tensor:
    """Θ_ijab (N1, N2, K, K) in float64. Where a BatchNorm normalises by batch statistics
    (bn="batch"; bn="eval" with a BatchNorm without running statistics), x1 and x2 form
    one batch (fastntk's documented cross-kernel of coupled samples)."""
    if x2 is None:
        J1 = jacobian(model, x1, bn, params)
        J2 = J1
    elif _batch_statistics(model, bn):
        J = jacobian(model, torch.cat([x1, x2]), bn, params)
        J1, J2 = J[: x1.shape[0]], J[x1.shape[0] :]
    else:
        J1 = jacobian(model, x1, bn, params)
        J2 = jacobian(model, x2, bn, params)
    return torch.einsum("iap,jbp->ijab", J1, J2)


def reduce(full: torch.Tensor, output) -> torch.Tensor:
    """The kernel of an output mode from the full kernel."""
    if output == "full":
        return full
    if output == "sum":
        return full.sum((2, 3))
    if output == "trace":
        return full.diagonal(dim1=2, dim2=3).sum(-1)
    if output == "mean":
        return full.diagonal(dim1=2, dim2=3).mean(-1)
    if isinstance(output, int):
        return full[:, :, output, output]
    raise ValueError(output)


def reference_ntk(model, x1, x2=None, *, output="sum", bn="eval", params=None) -> torch.Tensor:
    return reduce(full_kernel(model, x1, x2, bn, params), output)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both vanish)."""
    den = b.abs().max().item()
    num = (a.double() - b.double()).abs().max().item()
    return num / den if den > 0 else num
