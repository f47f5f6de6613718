"""The empirical NTK engine: ``fastntk.ntk``.

Methods
-------
``"layerwise"`` (the fast path). One forward pass keeps each parameterised
layer's input (forward hooks store references, the tensors autograd keeps
anyway); one backward pass per output weighting delivers each layer's output
gradient through a hook on the layer's autograd node, *during* the backward,
where the layer's rule turns (input, output gradient) into per-sample
gradient blocks that are contracted into the kernel and dropped. The batch
weight gradients are never computed (the backward runs to the input only),
and the N x P Jacobian never exists. Modules without a rule fall back to an
exact per-module torch.func computation; parameters used outside any module
call fall back to a whole-model torch.func computation.

``"vmap"``: torch.func ``vmap(jacrev)`` per sample, chunked over samples
(holds the Jacobian: the baseline fastntk replaces).

``"loop"``: one backward per sample and output (TE-NAS / LGA reference
codes; reference only).

``"csrc"``: the layerwise path with fastntk's C++ (and CUDA) ops wherever they apply.

Reading order
-------------
:func:`ntk` parses its options once (:mod:`.options`), makes a frozen plan
(:mod:`.plan`: strategy, a route per module, chunk sizes, the re-plans a forward can
call for) and runs it (``_run``) with the call's state (:mod:`.call`: copies, head,
workspace, plan) under one of the strategies:

* :mod:`.layerwise`: per-sample gradient blocks captured through hooks (:mod:`.capture`,
  with the sample dims measured by :mod:`.probe`, the routes of the chunk's parameters
  decided by :mod:`.classify` and the graph walks of :mod:`.graph`; the torch.func
  fallbacks in :mod:`.fallback`), contracted by :mod:`.gram`, or by :mod:`.panels` over
  several chunks;
* :mod:`.jacobian`: torch.func ``vmap(jacrev)``;
* :mod:`.coupled`: one-hot backward passes through the batch graph.

A kernel that is not finite is explained by :mod:`.diagnose`; the byte budgets are in
:mod:`.sizes`, the sketch's hashes and projection in :mod:`.sketch`.

Samples that interact in the forward pass (``bn="batch"``, or BatchNorm
without running statistics) cannot be factorised per sample: every method
then differentiates each sample's outputs through the shared batch graph
with one-hot backward passes (batched with ``is_grads_batched`` for
``method="vmap"`` and on GPUs; a loop on the CPU, where it measured faster).

Memory
------
Beyond the model's own forward+backward, the layerwise path holds the kernel
(N1 x N2) and one block of per-sample gradients (samples x columns; columns
bounded by ``chunk_size``). Batches larger than the sample chunk are processed
in chunks: a *panel* of rows keeps its per-sample gradients while the column
chunks stream past it, so the kernel is assembled blockwise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from fastntk import _model
from fastntk._progress import bar as progress_bar
from fastntk.engine import (
    capture,
    classify,
    coupled,
    diag,
    diagnose,
    jacobian,
    operator,
    options,
    plan,
    sizes,
    sketch,
)
from fastntk.engine.call import Call
from fastntk.engine.jacobian import CapturedMutationError
from fastntk.engine.layerwise import Layerwise
from fastntk.engine.operator import NTKOperator
from fastntk.engine.options import DEFAULT_SAMPLE_CHUNK, METHODS
from fastntk.errors import (
    InputError,
    NonFiniteKernelError,
    OptionError,
    UnsupportedError,
    UntraceableError,
)
from fastntk.profiling import phase

__all__ = [
    "DEFAULT_SAMPLE_CHUNK", "METHODS", "CapturedMutationError", "NTKOperator", "ntk",
    "ntk_block", "ntk_diag", "ntk_operator", "ntk_sketch",
]  # fmt: skip


@_model.with_grad
def ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    output: str | int | Callable[[Any], torch.Tensor] = "sum",
    bn: str = "eval",
    params: None | list[str] | Callable[[str, nn.Parameter], bool] = None,
    method: str = "auto",
    chunk_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
    sketch_dim: int = 4096,
    seed: int = 0,
) -> torch.Tensor:
    """Empirical neural tangent kernel Θ(x1, x2) of ``model``.

    Θ_ij = <∂f(x1_i)/∂θ, ∂f(x2_j)/∂θ> over the selected parameters θ, exact on
    every path but ``method="sketch"`` (an unbiased estimate).

    Args:
        model: any ``nn.Module`` mapping a batch (N, ...) to outputs (N, K)
            (or (N, ...), flattened to K; or a tuple whose last element is the
            logits, as NAS-Bench-201's ``(features, logits)``). It is never
            changed: parameters, buffers (BatchNorm statistics included),
            train/eval flags, ``requires_grad`` and hooks are as before, also
            when the call raises.
        x1: (N1, ...) inputs (floating point; integer token ids for models
            with ``nn.Embedding``).
        x2: (N2, ...) inputs or None for Θ(x1, x1) (symmetric; computed once).
        output: which function of the outputs the kernel is of.

            * ``"sum"``: NTK of Σ_k f_k (TE-NAS and the LGA reference code call
              ``logit.backward(ones)``). Shape (N1, N2).
            * ``"trace"``: Σ_k <∂f_k(x_i), ∂f_k(x_j)> (torch.func tutorial). (N1, N2).
            * ``"mean"``: trace / K (neural-tangents' default). (N1, N2).
            * ``"full"``: Θ_ijab = <∂f_a(x_i), ∂f_b(x_j)> (neural-tangents
              ``trace_axes=()``). Shape (N1, N2, K, K).
            * an int ``k``: NTK of logit k alone. (N1, N2).
            * a callable: applied to the model's raw output, must return one
              value per sample (N,); the kernel of that function.
        bn: BatchNorm semantics.

            * ``"eval"``: running statistics; each sample's output depends on
              itself only (neural-tangents / torch.func users, the LGA code's
              eval mode).
            * ``"batch"``: train-mode batch statistics, samples coupled: each
              sample's output is differentiated through the shared batch graph
              (exactly TE-NAS and the LGA code's train mode). For a
              cross-kernel, x1 and x2 form one batch.
            * ``"per_sample"``: each sample normalised by its own statistics
              (what ``vmap`` over a train-mode BatchNorm computes); a BatchNorm
              with one value per channel per sample ((N, C) features) is
              refused (UnsupportedError).

            Every other module runs in eval mode (dropout off) in all three.
        params: which parameters define the kernel: None = all with
            ``requires_grad``; a list of names; or a predicate
            ``(name, param) -> bool`` (the reference codes use
            ``lambda n, p: "weight" in n``, the LGA code also drops the
            classifier).
        method: ``"layerwise"`` (PyTorch ops), ``"triton"`` (fastntk's
            Triton kernels where they apply), ``"csrc"`` (layerwise with
            fastntk's C++ ops wherever they apply: the per-sample conv
            gradient, every dense Gram; on a GPU the CUDA build's kernels;
            needs the compiled extension, see :func:`fastntk.env`), ``"auto"``
            (layerwise, with the choice of strategies measured fastest), ``"vmap"``
            (torch.func ``vmap(jacrev)``, holds the Jacobian), ``"loop"``
            (per-sample backward; reference only), or ``"sketch"``: the
            unbiased randomised estimate S1 S2ᵀ from :func:`ntk_sketch`
            (``sketch_dim`` columns, ``seed``; the only inexact method).
        chunk_size: samples per forward/backward chunk (int), or
            ``(samples, columns)`` also bounding the columns of one
            per-sample gradient block (``columns=None``: the default bound).
            Default: 256 samples, 256 MiB blocks.
        dtype: computation dtype (``torch.float64`` for exactness); default:
            the dtype of the model's parameters.
        progress: a progress bar of the chunks on stderr: True always, False never,
            None (the default) for multi-chunk computations where stderr is a terminal.

    Returns:
        Θ: (N1, N2), or (N1, N2, K, K) for ``output="full"``, in ``dtype``.

    Raises:
        fastntk.errors.FastNTKError subclasses: InputError / InputTypeError
        (empty batch, mismatched shapes, non-floating inputs, wrong device),
        OptionError (unknown ``bn``/``method``/``output``, logit out of
        range), ParameterSelectionError (nothing selected, unknown name),
        NonFiniteKernelError (names the first layer, in forward order,
        whose gradients are not finite).
    """
    opts = options.parse(
        model, x1, x2, output=output, bn=bn, params=params, method=method,
        chunk_size=chunk_size, dtype=dtype, progress=progress, sketch_dim=sketch_dim, seed=seed,
    )  # fmt: skip
    x1, x2 = _model.plain(x1), _model.plain(x2)
    if method == "sketch":

        def sketch(x: torch.Tensor) -> torch.Tensor:
            return ntk_sketch(
                model, x, output=output, bn=bn, params=params, chunk_size=chunk_size,
                dtype=opts.dtype, sketch_dim=opts.sketch_dim, seed=opts.seed, progress=progress,
            )  # fmt: skip

        s1 = sketch(x1)
        return s1 @ (s1 if x2 is None else sketch(x2)).T
    return _exact(model, opts, x1, x2)


@_model.with_grad
def ntk_block(
    model: nn.Module,
    x: torch.Tensor,
    rows: list[int],
    cols: list[int],
    *,
    output: str | int | Callable[[Any], torch.Tensor] = "sum",
    bn: str = "eval",
    params: None | list[str] | Callable[[str, nn.Parameter], bool] = None,
    method: str = "auto",
    chunk_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One block of the kernel of the batch ``x``: ``ntk(model, x)[rows][:, cols]``,
    computed without the rest (a tile of :func:`fastntk.distributed.ntk`).

    Where the samples are independent (``bn="eval"``/``"per_sample"``, no coupling found)
    it is ``ntk(model, x[rows], x[cols])``; where the batch couples them (``bn="batch"``, a
    coupling the probe finds) every sample of ``x`` takes part in the forward, as in
    ``ntk(model, x)``, and only the rows' and columns' samples are differentiated.
    Options as :func:`ntk` (not ``"sketch"``); ``rows == cols``: a symmetric block.
    """
    if method == "sketch":
        raise OptionError("ntk_block computes exact blocks: method='sketch' has no blocks")
    opts = options.parse(
        model, x, None, output=output, bn=bn, params=params, method=method,
        chunk_size=chunk_size, dtype=dtype, progress=False,
    )  # fmt: skip
    x = _model.plain(x)
    rows, cols = [int(i) for i in rows], [int(j) for j in cols]
    n = x.shape[0]
    if not rows or not cols or not all(0 <= i < n for i in rows + cols):
        raise InputError(f"ntk_block needs non-empty rows and cols within the {n} samples")
    return _exact(model, opts, x, None, block=(rows, cols))


def _exact(
    model: nn.Module,
    opts: options.Options,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    block: tuple[list[int], list[int]] | None = None,
) -> torch.Tensor:
    """The exact kernel (``block``: of the batch ``x1``, its rows and columns only) by the
    plan for these inputs, in the call's model state; a non-finite one raises
    :class:`NonFiniteKernelError` naming the first layer at fault."""
    n = x1.shape[0] + (0 if x2 is None else x2.shape[0])
    the_plan = plan.make(model, opts, n, x1.device)
    with _model.model_state(model, opts.bn), _inplace_refused():
        call, theta = _run(model, opts, the_plan, x1, x2, block)
        if not bool(torch.isfinite(theta).all()):
            if block is not None:
                rows, cols = block
                x1, x2 = x1[rows], None if rows == cols else x1[cols]
            raise NonFiniteKernelError(diagnose.nonfinite(call, x1, x2))
    return theta


def _run(
    model: nn.Module,
    opts: options.Options,
    p: plan.Plan,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    block: tuple[list[int], list[int]] | None = None,
) -> tuple[Call, torch.Tensor]:
    """Run plan ``p``, and the plan taking over where a forward shows a fact it names
    (:attr:`plan.Plan.on`). Returns the call's state that made the kernel, and the kernel.
    ``block``: (rows, cols) of the batch ``x1``'s kernel only (:func:`ntk_block`)."""
    call = Call(model, opts, p)
    while True:
        a, b = x1, x2
        if block is not None and p.strategy != "coupled":  # independent samples: a cross
            a, b = x1[block[0]], None if block[0] == block[1] else x1[block[1]]
        try:
            if p.strategy == "layerwise":
                return call, Layerwise(call).kernel(a, b)
            if p.strategy == "jacobian":
                return call, jacobian.kernel(call, a, b)
            return call, coupled.kernel(call, x1, x2, block)
        except (
            classify.SamplesCoupled, CapturedMutationError, UntraceableError,
            _model.MergedSamplesError,
        ) as e:  # fmt: skip
            fact = (
                plan.SAMPLES_COUPLED if isinstance(e, classify.SamplesCoupled)
                else plan.CAPTURED_MUTATION if isinstance(e, CapturedMutationError)
                else plan.UNTRACEABLE if isinstance(e, UntraceableError)
                else plan.MERGED_SAMPLES
            )  # fmt: skip
            nxt = p.after(fact)
            if nxt is None:
                raise
            p = nxt
            if p.fresh:  # (the failed forward changed the copies)
                call = Call(model, opts, p)
            else:
                call.plan = p


@_model.with_grad
def ntk_sketch(
    model: nn.Module,
    x: torch.Tensor,
    *,
    sketch_dim: int = 4096,
    seed: int = 0,
    output: str | int | Callable[[Any], torch.Tensor] = "sum",
    bn: str = "eval",
    params: None | list[str] | Callable[[str, nn.Parameter], bool] = None,
    chunk_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """A sketch S (N, m) of the per-sample gradients with Θ ≈ S Sᵀ, for N too large for Θ.

    Each parameter coordinate c is hashed to one of ``m = sketch_dim``
    columns h(c) with a random sign s(c) (a CountSketch: drawn by torch's CPU
    generator in segments of ``sketch.SEGMENT`` coordinates, each seeded from ``seed``,
    the parameter's name, the pass and the segment; never a P x m matrix), and
    S_i = Σ_c s(c) G_i[c] e_h(c) is
    accumulated layer by layer in sample chunks, so memory is O(N m + one chunk)
    (plus at most ``sketch.HASH_BYTES`` of hashes kept between chunks). The estimate is
    unbiased: E[S_i · S_j] = Θ_ij, with variance
    (Θ_ii Θ_jj + Θ_ij² - 2 Σ_c G_ic² G_jc²) / m (tests/test_sketch.py holds the
    mean squared error to it). So the error of an entry is of order
    √(Θ_ii Θ_jj / m), relative to the diagonal, not to |Θ_ij|, and the relative
    Frobenius error ‖S Sᵀ - Θ‖_F / ‖Θ‖_F shrinks like 1/√m; a few large gradient
    coordinates make it vary from seed to seed. Measured on the NAS-Bench-201
    benchmark network: bench/results/sketch_error_cpu.md
    (``python bench/bench_sketch.py --sweep ...``). The same seed gives the same
    hashes on any device and for any chunking (the sketch is the same up to the
    rounding of the sums' order), so sketches of different batches
    combine: Θ(x1, x2) ≈ S(x1) S(x2)ᵀ. For ``output="trace"``/``"mean"`` the K
    logits' gradients are hashed independently and summed (still unbiased).

    Args: as :func:`ntk`, plus ``sketch_dim`` (m) and ``seed``.

    Returns:
        S: (N, m) in the computation dtype (the kernel's estimate is ``S @ S.T``;
        for ``output="mean"``, S is scaled by 1/√K).
    """
    opts = options.parse(
        model, x, None, output=output, bn=bn, params=params, method="auto",
        chunk_size=chunk_size, dtype=dtype, progress=progress, sketch_dim=sketch_dim, seed=seed,
        scalar=True,
    )  # fmt: skip
    x = _model.plain(x)
    sketch_dim, samples, dtype = opts.sketch_dim, opts.samples, opts.dtype
    call = Call(model, opts, plan.make(model, opts, x.shape[0], x.device, sketch=True))
    rnn = _model.recurrent(model)
    if rnn is not None:
        raise UnsupportedError(
            f"the sketch cannot take {rnn}: it streams per-layer "
            "per-sample gradients, and no rule or torch.func fallback covers recurrent "
            "layers; use fastntk.ntk(method='auto') (exact, through the batch graph)"
        )
    if _model.is_coupled(model, bn):
        raise OptionError(
            "the sketch needs per-sample independent outputs; bn='batch' (or BatchNorm without "
            "running statistics) couples samples: use bn='eval' or 'per_sample'"
        )
    n = x.shape[0]
    need, have = n * sketch_dim * dtype.itemsize, sizes.device_memory(call.device)
    why = None
    if need > have:  # (an allocator that overcommits would try it)
        why = f"more than the {have / 2**30:.3g} GiB of {call.device}"
    else:
        try:
            S = torch.zeros(n, sketch_dim, dtype=dtype, device=call.device)
        except RuntimeError as e:  # the allocator's failure
            why = f"{type(e).__name__}: {e}"
    if why is not None:
        raise OptionError(
            f"the ({n}, {sketch_dim}) sketch does not fit ({need / 2**30:.3g} GiB of {dtype}; "
            f"{why}): choose a smaller sketch_dim"
        )
    projection = sketch.Projection(S, call.copies.params, opts.seed)
    K = 0
    layerwise = Layerwise(call)
    chunks = -(-n // samples)
    show = False if progress is None and chunks == 1 else progress
    bar = progress_bar(chunks, "sketch", "chunk", show)  # None: on a terminal
    with _model.model_state(model, bn), _inplace_refused():
        for s0 in range(0, n, samples):
            s1 = min(n, s0 + samples)

            def consume(key, blk, s0=s0, s1=s1):
                with phase("sketch"):
                    projection.add(key, blk, s0, s1)

            try:
                K = layerwise.run_chunk(x[s0:s1], consume, capture.always)
            except classify.SamplesCoupled as e:
                raise OptionError(
                    f"the sketch needs per-sample independent outputs, but {e}"
                ) from None
            bar.update()
    bar.close()
    if output == "mean":
        S /= math.sqrt(K)
    if not bool(torch.isfinite(S).all()):
        with _model.model_state(model, bn):  # the diagnosis' forwards in the call's modes
            raise NonFiniteKernelError(diagnose.nonfinite(call, x, None))
    return S


def ntk_operator(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    output: str | int = "sum",
    bn: str = "eval",
    params: None | list[str] | Callable[[str, nn.Parameter], bool] = None,
    chunk_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
) -> operator.NTKOperator:
    """Θ(x1, x2) as a linear operator, without the N1×N2 matrix.

    ``A @ V`` for V of shape (N2,) or (N2, k) is Θ V, exact (Θ V = J (Jᵀ V): a backward and
    a Jacobian-vector product per pass through the batch graph, forward mode or a double
    backward, so every BN mode, the coupled ``bn="batch"`` too); ``A.T`` is Θ(x2, x1); ``A.shape``; ``A.to_scipy()`` a
    ``scipy.sparse.linalg.LinearOperator``. For ``output="full"`` the operator acts on the
    flattened (sample, logit) index: shape (N1·K, N2·K). Memory: one sample chunk's graph
    (``bn="batch"``: the whole batch's) and the products' k columns of parameter size.
    Derivation and costs: :mod:`fastntk.engine.operator`. Options as :func:`ntk`
    (``output``: "sum", "trace", "mean", "full" or a logit).
    """
    return operator.make(model, x1, x2, output=output, bn=bn, params=params,
                         chunk_size=chunk_size, dtype=dtype)  # fmt: skip


@_model.with_grad
def ntk_diag(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: str | int = "sum",
    bn: str = "eval",
    params: None | list[str] | Callable[[str, nn.Parameter], bool] = None,
    chunk_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """The exact diagonal Θ_ii of ``ntk(model, x)``: (N,), or (N, K, K) for
    ``output="full"``, in O(N) memory, without Θ: each sample's squared per-sample
    gradient norm from the layerwise rules' blocks (:mod:`fastntk.engine.diag`), or from
    Jacobian rows through the batch graph where the batch couples the samples. Options as
    :func:`ntk`."""
    opts = options.parse(
        model, x, None, output=output, bn=bn, params=params, method="auto",
        chunk_size=chunk_size, dtype=dtype, progress=progress,
    )  # fmt: skip
    x = _model.plain(x)
    call = Call(model, opts, plan.make(model, opts, x.shape[0], x.device))
    with _model.model_state(model, bn), _inplace_refused():
        d = diag.diagonal(call, x)
        if not bool(torch.isfinite(d).all()):
            raise NonFiniteKernelError(diagnose.nonfinite(call, x, None))
    return d


@contextlib.contextmanager
def _inplace_refused() -> Iterator[None]:
    """autograd's error for a tensor its backward needs that the forward then changed in
    place (a weight clamped in forward under no_grad) as a typed error. The change went
    to the call's private copies, not to the user's parameters."""
    try:
        yield
    except RuntimeError as e:
        if "modified by an inplace operation" not in str(e):
            raise
        raise UnsupportedError(
            "the model's forward changes a tensor in place that autograd saved for the "
            "backward (e.g. a weight clamped or renormalised in forward), and this method runs "
            "that forward again after saving it; method='loop' or 'vmap' (one forward per "
            "graph) compute the kernel of the weights as the forward leaves them, or make the "
            "change out of place (w = w.clamp(...)) or apply it to the model before the call"
        ) from e
