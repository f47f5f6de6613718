"""The NTK as a linear operator: products Θ V without the N×N matrix
(:func:`fastntk.ntk_operator`).

Derivation. With J the Jacobian of the kernel's functions with respect to the selected
parameters, Θ = Σ_p J_p J_pᵀ over the head's passes p (one pass of ones for ``"sum"``: the
NTK of Σ_k f_k; a one-hot pass per logit for ``"trace"``/``"mean"``), or Θ = J Jᵀ over
the (N·K) outputs for ``"full"``. So Θ V = Σ_p J_p (J_pᵀ V):

* ``u = J_pᵀ V``, a vector-Jacobian product: one backward of the outputs with the
  cotangent ``V ⊗ w_p`` (``torch.autograd.grad``);
* ``J u``, a Jacobian-vector product: on a graph the operator keeps (a side in one
  chunk, the coupled batch), by the double-backward trick: ``g(v) = Jᵀ v`` is linear in
  ``v``, so its graph (built once with ``create_graph=True`` at a dummy ``v``) gives
  ``J u = ∂(g(v)·u)/∂v``, one more backward; on a streamed chunk, by forward-mode AD:
  one forward with the parameters dual (tangent ``u``) and no graph, where every op has
  a forward derivative (else the double backward);

both through the batch graph, so the product is exact in every BN mode, the coupled
``bn="batch"`` too, at a few passes per product instead of N. The k columns of V go
through both steps together on a GPU (``is_grads_batched``), one after another on the
CPU (where that measured faster: :func:`_grad`). Where the samples are independent (``bn="eval"``/``"per_sample"``) the products
stream over sample chunks (one chunk's graph at a time; a side that fits in one chunk
keeps its graph between products); ``bn="batch"`` keeps the whole batch's graph for the
operator's life.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastntk import _model
from fastntk.engine import options, plan
from fastntk.engine.call import Call
from fastntk.errors import InputError, InputTypeError, OptionError


class _Graph:
    """One forward of a batch ``x`` (a chunk, or the whole coupled batch) and what the
    products need from it: the outputs y (n, K), and lazily the graph of g(v) = Jᵀ v."""

    def __init__(self, call: Call, x: torch.Tensor):
        self.call = call
        xp = x.detach().to(call.dtype) if x.is_floating_point() else x
        # attention in its math form: the fused CPU/GPU attention kernels have no double
        # backward (the Jacobian-vector products need one); the math form is the same
        # function, composed of ops that have
        with (
            _model.bn_rows_checked(call.model, call.copies, xp, call.bn),
            sdpa_kernel([SDPBackend.MATH]),
        ):
            raw = call.copies.call(call.model, xp)
        self.y = call.head(raw, x.shape[0])
        self.params = [call.copies.params[p] for p in call.selected]
        self._v: torch.Tensor | None = None
        self._g: list[torch.Tensor] | None = None

    def vjp(self, cot: torch.Tensor) -> list[torch.Tensor]:
        """Σ over the (n, K) cotangents ``cot`` (B, n, K) of Jᵀ cot: (B, *param) each."""
        return _grad(self.y, self.params, cot)

    def jvp(self, u: list[torch.Tensor]) -> torch.Tensor:
        """J u for a batch of parameter directions ``u`` (B, *param): (B, n, K)."""
        if self._g is None:
            self._v = torch.zeros_like(self.y, requires_grad=True)
            self._g = list(
                torch.autograd.grad(
                    self.y, self.params, self._v, create_graph=True, allow_unused=True
                )
            )
        pairs = [
            (g, w) for g, w in zip(self._g, u, strict=True) if g is not None and g.requires_grad
        ]
        if not pairs:
            return self.y.new_zeros(u[0].shape[0], *self.y.shape)
        gs, ws = zip(*pairs, strict=True)
        (out,) = _grad(list(gs), [self._v], list(ws))
        return out


# The forward-mode check's tolerance, relative to the product's largest entry: rounding
# differs between the two modes; a convention (padding_idx) differs at order one.
_CHECK_TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def _backward_conventions(model: nn.Module) -> bool:
    """Whether a module's backward is, by convention, not the derivative of its forward:
    embeddings with a ``padding_idx`` (no gradient for that row) or ``scale_grad_by_freq``.
    Forward-mode products would not be of the kernel's Jacobian there."""
    return any(
        isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        and (m.padding_idx is not None or m.scale_grad_by_freq)
        for m in model.modules()
    )


def _forward_jvp(call: Call, x: torch.Tensor, u: list[torch.Tensor], graph: bool) -> torch.Tensor:
    """J u for a batch of parameter directions ``u`` (B, *param) by forward-mode AD: per
    direction, one forward of ``x`` with the selected parameters dual; ``graph=False``
    under ``no_grad``, ``True`` with parameters that require a gradient (so that modules
    with a fused inference path, ``nn.MultiheadAttention``'s, take their differentiable
    one). Returns (B, n, K). Raises what torch raises for an op without a forward
    derivative."""
    xp = x.detach().to(call.dtype) if x.is_floating_point() else x
    out = []
    for b in range(u[0].shape[0]):
        with (
            fwAD.dual_level(),
            torch.set_grad_enabled(graph),
            sdpa_kernel([SDPBackend.MATH]),
        ):
            duals = {q: fwAD.make_dual(call.copies.params[q].detach().requires_grad_(graph), t[b])
                     for q, t in zip(call.selected, u, strict=True)}  # fmt: skip
            y = call.head(call.copies.call(call.model, xp, params=duals), x.shape[0])
            tangent = fwAD.unpack_dual(y).tangent
            out.append(torch.zeros_like(y) if tangent is None else tangent.detach().clone())
    return torch.stack(out)


def _grad(outputs, inputs, cot) -> list[torch.Tensor]:
    """``autograd.grad`` for a leading batch dim of cotangents: batched
    (``is_grads_batched``) on a GPU, where an op has a batching rule; a loop on the CPU,
    where it measured faster (NB201 benchmark network, N=256, 16 columns: 127 s batched
    against 16 × 5.2 s looped; ``python bench/bench_operator.py``,
    bench/results/operator_cpu.md); unused inputs give zeros."""
    outs = outputs if isinstance(outputs, list) else [outputs]
    cots = cot if isinstance(cot, list) else [cot]
    B = cots[0].shape[0]
    gs = None
    if cots[0].is_cuda and B > 1:
        try:
            gs = torch.autograd.grad(outs, inputs, cots, retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)  # fmt: skip
        except RuntimeError:
            gs = None  # an op without a batching rule: the loop
    if gs is None:
        per = [torch.autograd.grad(outs, inputs, [c[b] for c in cots], retain_graph=True,
                                   allow_unused=True) for b in range(B)]  # fmt: skip
        gs = [None if per[0][i] is None else torch.stack([p[i] for p in per])
              for i in range(len(inputs))]  # fmt: skip
    return [
        torch.zeros(B, *t.shape, dtype=t.dtype, device=t.device) if g is None else g
        for g, t in zip(gs, inputs, strict=True)
    ]


class NTKOperator:
    """Θ(x1, x2) as a linear operator: ``A @ V``, ``A.T``, ``A.shape``, :meth:`to_scipy`.

    ``A @ V`` takes V of shape (N2,) or (N2, k) (for ``output="full"``: (N2·K,) or
    (N2·K, k), the (sample, logit) index flattened sample-major, as ``ntk(...)`` reshaped
    (N1·K, N2·K) after ``permute(0, 2, 1, 3)``) and returns Θ V of shape (N1,) or (N1, k).
    ``products`` counts the columns multiplied so far (each costs a backward and a
    Jacobian-vector product per pass, over the batch graph). ``forward_mode``: whether
    streamed chunks' Jacobian-vector products go by forward-mode AD (False where a module's
    backward is not its derivative by convention, and once an op without a forward
    derivative, or a first product that differed from the double backward's, sent them
    to the double backward)."""

    def __init__(self, model: nn.Module, opts: options.Options, x1: torch.Tensor,
                 x2: torch.Tensor | None, *, _transposed: NTKOperator | None = None):  # fmt: skip
        self.model, self.opts, self.x1, self.x2 = model, opts, x1, x2
        self.products = 0
        self.forward_mode = not _backward_conventions(model)
        self._forward_graph = self._forward_checked = False
        if _transposed is not None:  # (the transpose shares the forwards' state)
            self.call, self.K, self.coupled = _transposed.call, _transposed.K, _transposed.coupled
            self._cache = _transposed._cache
            self._rows, self._cols = _transposed._cols, _transposed._rows
            self._T = _transposed
        else:
            n = x1.shape[0] + (0 if x2 is None else x2.shape[0])
            the_plan = plan.make(model, opts, n, x1.device)
            self.coupled = the_plan.strategy == "coupled"
            self.call = Call(model, opts, the_plan)
            self._cache: dict[Any, _Graph] = {}
            n1 = x1.shape[0]
            self._rows = ("x1", 0, n1)
            self._cols = ("x1", 0, n1) if x2 is None else ("x2", 0, x2.shape[0])
            with _model.model_state(model, opts.bn), torch.no_grad():  # (a forward shows K)
                xs = x1[: min(2, n1)]
                xs = xs.to(opts.dtype) if xs.is_floating_point() else xs
                self.K = self.call.head(self.call.copies.call(model, xs)).shape[1]
            self._T = None
        R = self.K if self.opts.output == "full" else 1
        self.shape = (R * (self._rows[2] - self._rows[1]), R * (self._cols[2] - self._cols[1]))
        self.dtype = opts.dtype
        self.device = x1.device

    @property
    def products_total(self) -> int:
        """Columns multiplied by this operator and its transpose together."""
        return self.products + (self._T.products if self._T is not None else 0)

    @property
    def T(self) -> NTKOperator:
        """Θ(x2, x1) = Θ(x1, x2)ᵀ."""
        if self._T is None:
            self._T = NTKOperator(self.model, self.opts, self.x1, self.x2, _transposed=self)
        return self._T

    # -- the batches and their graphs ------------------------------------------------------
    def _side(self, which: str) -> torch.Tensor:
        return self.x1 if which == "x1" else self.x2

    def _graph_of(self, x: torch.Tensor, key: Any) -> _Graph:
        g = self._cache.get(key) if key is not None else None
        if g is None:
            g = _Graph(self.call, x)
            if key is not None:
                self._cache[key] = g
        return g

    def _chunks(self, side: tuple[str, int, int]):
        """(the chunk's samples, its graph's cache key (None: not kept), the side's rows in
        its outputs, their offset within the side) of each chunk of a side's samples; in
        the coupled mode the whole batch [x1; x2], kept, and the side's rows in it."""
        which, r0, r1 = side
        if self.coupled:
            x = self.x1 if self.x2 is None else torch.cat([self.x1, self.x2])
            off = 0 if which == "x1" else self.x1.shape[0]
            yield x, "batch", slice(off + r0, off + r1), 0
            return
        x = self._side(which)[r0:r1]
        step = self.call.samples
        keep = x.shape[0] <= step  # a side in one chunk keeps its graph between products
        for s0 in range(0, x.shape[0], step):
            yield x[s0 : s0 + step], ((which, r0 + s0) if keep else None), slice(None), s0

    def _jvp(self, x: torch.Tensor, key: Any, u: list[torch.Tensor]) -> torch.Tensor:
        """J u on chunk ``x``: over its kept graph, else by forward mode where it works
        (without a graph, else with one; else the double backward over a graph). The
        first forward-mode product is checked against the double backward: an op whose
        backward is not its derivative by convention (``nn.Embedding``'s ``padding_idx``
        row gets no gradient, though the output depends on it) would make J u differ from
        the Jacobian the kernel is of; such a model keeps the double backward."""
        while key is None and self.forward_mode:
            try:
                Ju = _forward_jvp(self.call, x, u, self._forward_graph)
            except (RuntimeError, NotImplementedError):  # an op without a forward derivative
                if self._forward_graph:
                    self.forward_mode = False
                self._forward_graph = True
                continue
            if not self._forward_checked:
                self._forward_checked = True
                ref = self._graph_of(x, None).jvp(u)
                scale = float(ref.abs().max())
                if float((Ju - ref).abs().max()) > _CHECK_TOL[self.dtype] * max(scale, 1e-30):
                    self.forward_mode = False
                    return ref
            return Ju
        return self._graph_of(x, key).jvp(u)

    # -- the product -------------------------------------------------------------------------
    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        V, squeeze = self._check(V)
        with _model.model_state(self.model, self.opts.bn), torch.enable_grad():
            out = self._apply(V)
        self.products += V.shape[1]
        return out[:, 0] if squeeze else out

    def _check(self, V: Any) -> tuple[torch.Tensor, bool]:
        if not isinstance(V, torch.Tensor):
            raise InputTypeError(f"A @ V takes a tensor V, got {type(V).__name__}")
        if not V.is_floating_point():
            raise InputTypeError(f"A @ V takes a floating-point V, got {V.dtype}")
        if V.dim() not in (1, 2) or V.shape[0] != self.shape[1]:
            raise InputError(
                f"A @ V takes V of shape ({self.shape[1]},) or ({self.shape[1]}, k) for this "
                f"{self.shape[0]}x{self.shape[1]} operator, got {tuple(V.shape)}"
            )
        squeeze = V.dim() == 1
        V = V.detach().to(self.dtype).to(self.device)
        return (V[:, None] if squeeze else V), squeeze

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        """Θ V for V (R·n_cols, k): Σ over passes of J_rows (J_colsᵀ V)."""
        full, K, k = self.opts.output == "full", self.K, V.shape[1]
        n_cols = self._cols[2] - self._cols[1]
        Vc = V.T.reshape(k, n_cols, K) if full else V.T  # (k, n_cols[, K])
        weights = self._passes()
        # cotangents per (pass, column): (P·k, n, K)
        u = None
        for x, key, rows, s0 in self._chunks(self._cols):
            graph = self._graph_of(x, key)
            m = graph.y[rows].shape[0]
            cot = graph.y.new_zeros(len(weights) * k, *graph.y.shape)
            part = Vc[:, s0 : s0 + m]
            for p, w in enumerate(weights):
                cot[p * k : (p + 1) * k, rows] = part if full else part[..., None] * w
            du = graph.vjp(cot)
            u = du if u is None else [a + b for a, b in zip(u, du, strict=True)]
        n_rows = self._rows[2] - self._rows[1]
        out = V.new_zeros(k, n_rows, K) if full else V.new_zeros(k, n_rows)
        for x, key, rows, s0 in self._chunks(self._rows):
            Ju = self._jvp(x, key, u)[:, rows]  # (P·k, m, K)
            m = Ju.shape[1]
            for p, w in enumerate(weights):
                blk = Ju[p * k : (p + 1) * k]
                out[:, s0 : s0 + m] += blk if full else (blk * w).sum(-1)
        if self.opts.output == "mean":
            out = out / K
        return out.reshape(k, -1).T

    def _passes(self) -> list[torch.Tensor]:
        """The head's output weightings w_p (K,) (``"full"``: one pass of the cotangent)."""
        if self.opts.output == "full":
            return [torch.ones(self.K, dtype=self.dtype, device=self.device)]
        y = torch.zeros(1, self.K, dtype=self.dtype, device=self.device)
        return [w[0] for w in self.call.head.passes(y)]

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(v):
            t = torch.from_numpy(np.ascontiguousarray(v)).to(self.dtype)
            return (self @ t).detach().cpu().double().numpy()

        def rmv(v):
            t = torch.from_numpy(np.ascontiguousarray(v)).to(self.dtype)
            return (self.T @ t).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=rmv, matmat=mv, rmatmat=rmv,
                              dtype=np.float64)  # fmt: skip

    def __repr__(self) -> str:
        return (f"NTKOperator(shape={self.shape}, output={self.opts.output!r}, "
                f"bn={self.opts.bn!r}, dtype={self.dtype}, products={self.products})")  # fmt: skip


def make(model, x1, x2=None, *, output="sum", bn="eval", params=None, chunk_size=None,
         dtype=None) -> NTKOperator:  # fmt: skip
    opts = options.parse(
        model, x1, x2, output=output, bn=bn, params=params, method="auto",
        chunk_size=chunk_size, dtype=dtype, progress=False,
    )  # fmt: skip
    if callable(output) and not isinstance(output, (str, int)):
        raise OptionError("ntk_operator takes output 'sum', 'trace', 'mean', 'full' or an int")
    x1, x2 = _model.plain(x1), _model.plain(x2)
    return NTKOperator(model, opts, x1, x2)
