"""Gram rule of ``nn.MultiheadAttention`` (packed q/k/v projection, no bias_k/bias_v, no
zero attention; masks, ``batch_first`` either way, self- and cross-attention).

Derivation. With ``q = x_q W_q^T + b_q`` (likewise k, v from the key and value inputs),
``o = Attention(q, k, v)`` (heads, scaling, masks, softmax) and ``y = o W_o^T + b_o``,
sample ``i``'s output depends on the parameters only through its own tokens, so with
``G = df_i/dy_i`` (the output gradient, (T, E) per sample):

    dW_o,i = G_i^T o_i            db_o,i = sum_t G_i
    dW_q,i = Gq_i^T x_q,i         db_q,i = sum_t Gq_i      (k, v alike)

where ``Gq = d<G, y>/dq`` is the gradient of the attention core at ``q``. The rule
re-runs the module's own forward over the batch with identity projections on the
projected ``q, k, v`` (leaf tensors it made), so that masks, scaling and softmax are
PyTorch's, and one autograd call gives ``Gq, Gk, Gv`` for every sample at once: one
extra forward and backward of the attention over the batch, instead of the per-sample
torch.func fallback. ``in_proj_weight``'s rows are q, k, v in that order.

A call whose returned attention weights (``need_weights=True``, the default) reach the
kernel's output takes the exact per-module fallback (:meth:`guards`: the rule sees only
the first output's gradient); returned but unused weights leave the rule exact. A call
with dropout in training mode is declined (:meth:`accepts`: a second dropout mask would
differ from the forward's; ``ntk()`` runs every module in eval mode anyway).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fastntk.rules import Dense, GramRule, register_gram_rule, same_data

_OUT = ("out_proj.weight", "out_proj.bias")


class _Saved:
    """The call's detached inputs and parameters (the engine's copies, in its dtype: they
    are the module's only during the forward) and, per output gradient, the four blocks
    computed once."""

    __slots__ = ("args", "kwargs", "w", "b", "wo", "bo", "memo")

    def __init__(self, module, args, kwargs):
        self.args, self.kwargs = args, kwargs
        self.w = module.in_proj_weight.detach()
        self.b = None if module.in_proj_bias is None else module.in_proj_bias.detach()
        self.wo = module.out_proj.weight.detach()
        self.bo = None if module.out_proj.bias is None else module.out_proj.bias.detach()
        self.memo: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}


@register_gram_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(GramRule):
    param_names = ("in_proj_weight", "in_proj_bias", *_OUT)

    def covers(self, module):
        return (
            module._qkv_same_embed_dim
            and module.in_proj_weight is not None
            and module.bias_k is None
            and module.bias_v is None
            and not module.add_zero_attn
        )

    def accepts(self, module, args, kwargs, output) -> bool:
        return module.dropout == 0.0 or not module.training

    def guards(self, module, args, kwargs, output):
        # attention weights returned (need_weights=True): exact only while they do not
        # reach the kernel's output, whose gradient the rule would then miss
        w = output[1] if isinstance(output, tuple) and len(output) == 2 else None
        return [w] if isinstance(w, torch.Tensor) and w.grad_fn is not None else []

    def save(self, module, args, kwargs, output, ctx):
        return _Saved(module, args, kwargs)

    def grad_rows(self, module, saved, gout, name, r0, r1):
        # supports_rows is False: r0:r1 is always every row
        hit = saved.memo.get(id(gout))
        if hit is None:
            hit = (gout, self._core_grads(module, saved, gout))
            saved.memo[id(gout)] = hit  # keeps gout alive: its id stays unique
        return Dense(_block(name, *hit[1]))

    @staticmethod
    def _core_grads(module, saved: _Saved, gout: torch.Tensor):
        """``(g, o, xs, (gq, gk, gv))`` in (N, T, E) layout: the output gradient, the
        attention core's output, the q/k/v inputs and the core's gradients at q, k, v."""
        call = _bind(saved.args, saved.kwargs)
        bd = 1 if module.batch_first is False else 0  # tensors to (N, T, E) below
        xs = [call[k].movedim(bd, 0) for k in ("query", "key", "value")]
        g = gout.movedim(bd, 0)
        e = module.embed_dim
        w, b = saved.w, saved.b
        with torch.enable_grad():
            proj = [
                F.linear(x, w[j * e : (j + 1) * e], None if b is None else b[j * e : (j + 1) * e])
                .detach()
                .requires_grad_(True)
                for j, x in enumerate(xs)
            ]
            mask = _sdpa_mask(module, call, xs[0].shape[0], xs[0].shape[1], xs[1].shape[1], w.dtype)
            if mask is not _UNSUPPORTED:
                o = _core(module, *proj, *mask)
            else:  # the module's own forward, identity projections in and out
                o = _shadow(module, saved, call, proj, bd)
            # o: the attention core's output (before out_proj); its gradient is G W_o.
            gs = torch.autograd.grad(o, proj, g @ saved.wo)
        return g, o.detach(), xs, gs


def _block(name: str, g, o, xs, gs) -> torch.Tensor:
    """Per-sample gradient block (N, numel) of parameter ``name`` (derivation at the top)."""
    n = g.shape[0]
    if name == "out_proj.weight":
        return torch.bmm(g.transpose(1, 2), o).reshape(n, -1)
    if name == "out_proj.bias":
        return g.sum(1)
    if name == "in_proj_bias":
        return torch.cat([gj.sum(1) for gj in gs], 1)
    if same_data(xs[0], xs[1]) and same_data(xs[1], xs[2]):
        # self-attention: one batched product for the three row blocks of in_proj
        return torch.bmm(torch.cat(gs, 2).transpose(1, 2), xs[0]).reshape(n, -1)
    return torch.cat(
        [torch.bmm(gj.transpose(1, 2), xj) for gj, xj in zip(gs, xs, strict=True)], 1
    ).reshape(n, -1)


_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
         "average_attn_weights", "is_causal")  # fmt: skip
_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "is_causal": False}
_UNSUPPORTED = object()


def _bind(args: tuple, kwargs: dict) -> dict:
    """``nn.MultiheadAttention.forward``'s arguments by name."""
    call = dict(_DEFAULTS)
    call.update(zip(_ARGS, args, strict=False))  # positional args: a prefix of _ARGS
    call.update(kwargs)
    return call


def _float_mask(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: masked out) as an additive float mask, as PyTorch reads it."""
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
    return m  # float masks keep their dtype until merged, as PyTorch merges them


def _sdpa_mask(module, call, n, tq, tk, dtype):
    """``(mask (N, heads, Tq, Tk) or None, is_causal)`` for scaled_dot_product_attention, as
    ``F.multi_head_attention_forward`` builds them (need_weights=False path), or
    ``_UNSUPPORTED`` for mask shapes left to the module's own forward."""
    kpm, am, causal = call["key_padding_mask"], call["attn_mask"], bool(call["is_causal"])
    if causal and kpm is None and not call["need_weights"]:
        return None, True  # PyTorch then ignores attn_mask's values: a causal hint
    if am is not None and am.dim() != 2:
        return _UNSUPPORTED  # (N*heads, Tq, Tk) masks: the module's forward handles them
    mask = None
    if am is not None:
        mask = _float_mask(am, dtype).view(1, 1, tq, tk)
    if kpm is not None:
        if kpm.dim() != 2:
            return _UNSUPPORTED
        k = _float_mask(kpm, dtype).view(n, 1, 1, tk)
        mask = k if mask is None else mask + k
    if mask is not None:
        mask = mask.to(dtype).expand(n, module.num_heads, tq, tk)
    return mask, False


def _core(module, q, k, v, mask, causal):
    """Multi-head scaled dot-product attention of projected (N, T, E) q, k, v."""
    n, tq, e = q.shape
    h = module.num_heads
    d = e // h
    qh, kh, vh = (t.reshape(n, -1, h, d).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal)
    return o.transpose(1, 2).reshape(n, tq, e)


def _shadow(module, saved: _Saved, call: dict, proj: list[torch.Tensor], bd: int) -> torch.Tensor:
    """The attention core through the module's own forward: identity projections in and
    out (exact; 4 extra E x E products per token), for the masks :func:`_sdpa_mask` leaves."""
    e = module.embed_dim
    eye = torch.eye(e, dtype=saved.w.dtype, device=saved.w.device)
    shadow = {"in_proj_weight": torch.cat([eye, eye, eye]), "out_proj.weight": eye}
    if saved.b is not None:
        shadow["in_proj_bias"] = torch.zeros_like(saved.b)
    if saved.bo is not None:
        shadow["out_proj.bias"] = torch.zeros_like(saved.bo)
    args = dict(call)
    args.update(
        query=proj[0].movedim(0, bd), key=proj[1].movedim(0, bd), value=proj[2].movedim(0, bd)
    )
    return functional_call(module, shadow, (), args)[0].movedim(bd, 0)
