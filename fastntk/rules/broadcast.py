"""Gram rule of parameters that a forward adds or expands over the batch outside any module
call: ViT position embeddings (``x + self.pos_embed``), class tokens
(``self.cls_token.expand(n, -1, -1)``).

Derivation. If ``y = x + alpha * p`` (or ``y = p.expand(n, ...)``) with ``p`` of shape
``(1, *s)`` broadcast over the batch, then ``f_i`` depends on ``p`` only through ``y_i``,
and ``df_i/dp = alpha * sum over the broadcast dims of g_i`` with ``g = df/dy``: the
output gradient of that one autograd node, reduced to ``p``'s shape. The engine finds such
uses by walking the autograd graph (a parameter used once, by an ``AddBackward0`` or
``ExpandBackward0`` node whose output has the batch in dim 0) and hooks that node as if it
were a module; any other use outside module calls goes to the exact whole-model fallback.
"""

from __future__ import annotations

from fastntk.rules import Dense, GramRule

#: autograd node names this rule understands
NODES = ("AddBackward0", "ExpandBackward0")


class BroadcastRule(GramRule):
    """Per-sample gradients of a batch-broadcast parameter (see the module docstring).

    ``saved`` is ``(parameter shape, alpha)``; ``gout`` is the node's output gradient
    ``(n, *s')`` with ``s'`` the broadcast of ``s``.
    """

    param_names = ()

    def grad_rows(self, module, saved, gout, name, r0, r1):
        shape, alpha = saved
        dims = [d for d in range(1, len(shape)) if shape[d] == 1 and gout.shape[d] != 1]
        g = gout.sum(dims, keepdim=True) if dims else gout
        G = g.reshape(g.shape[0], -1)
        return Dense(G if alpha == 1 else G * alpha)


def eligible(node, index: int, pshape: tuple[int, ...], n: int) -> float | None:
    """``alpha`` when ``node`` uses its input ``index`` (the parameter) as this rule needs,
    else None."""
    name = node.name()
    if name not in NODES or not pshape or pshape[0] != 1:
        return None
    try:
        out = tuple(node._input_metadata[0].shape)  # the node's output (gradient) shape
    except (AttributeError, IndexError, RuntimeError):
        return None
    if len(out) != len(pshape) or out[0] != n:
        return None
    if any(p not in (1, o) for p, o in zip(pshape[1:], out[1:], strict=True)):
        return None
    if name == "ExpandBackward0":
        return 1.0
    alpha = getattr(node, "_saved_alpha", None) if index == 1 else 1
    return float(alpha) if isinstance(alpha, (int, float)) else None
