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
call for) and runs it (``_run``): the layerwise strategy captures per-sample gradient
blocks through hooks (:mod:`.capture`, with the sample dims measured by :mod:`.probe`
and the graph walks of :mod:`.graph`) and contracts them (:mod:`.gram`); the byte
budgets are in :mod:`.sizes`, the sketch's hashes in :mod:`.sketch`.

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
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.func import jacrev, vmap

from fastntk import _model
from fastntk._model import Copies, Head
from fastntk._progress import bar as progress_bar
from fastntk.engine import capture, gram, graph, options, plan, probe, sizes, sketch
from fastntk.engine.options import DEFAULT_SAMPLE_CHUNK, METHODS
from fastntk.errors import NonFiniteKernelError, OptionError, UnsupportedError
from fastntk.profiling import count_gram, phase
from fastntk.rules import Block, Dense, GramRule, Workspace, gram_block

__all__ = ["DEFAULT_SAMPLE_CHUNK", "METHODS", "CapturedMutationError", "ntk", "ntk_sketch"]


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
    n = x1.shape[0] + (0 if x2 is None else x2.shape[0])
    the_plan = plan.make(model, opts, n, x1.device)
    with _model.model_state(model, bn), _inplace_refused():
        job, theta = _run(model, opts, the_plan, x1, x2)
        if not bool(torch.isfinite(theta).all()):
            raise NonFiniteKernelError(job.diagnose_nonfinite(x1, x2))
    return theta


def _run(
    model: nn.Module, opts: options.Options, p: plan.Plan, x1: torch.Tensor, x2: torch.Tensor | None
) -> tuple[_Job, torch.Tensor]:
    """Run plan ``p``, and the plan taking over where a forward shows a fact it names
    (:attr:`plan.Plan.on`). Returns the job that made the kernel, and the kernel."""
    job = _Job(model, opts, p)
    while True:
        try:
            if p.strategy == "layerwise":
                return job, job.layerwise(x1, x2)
            if p.strategy == "jacobian":
                return job, job.vmap(x1, x2)
            return job, job.coupled(x1, x2, batched=p.batched, use_vmap=p.use_vmap)
        except (capture.SamplesCoupled, CapturedMutationError, _model.MergedSamplesError) as e:
            fact = (
                plan.SAMPLES_COUPLED if isinstance(e, capture.SamplesCoupled)
                else plan.CAPTURED_MUTATION if isinstance(e, CapturedMutationError)
                else plan.MERGED_SAMPLES
            )  # fmt: skip
            nxt = p.after(fact)
            if nxt is None:
                raise
            p = nxt
            job = _Job(model, opts, p) if p.fresh else job.replanned(p)


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
    sketch_dim, seed, samples, dtype = opts.sketch_dim, opts.seed, opts.samples, opts.dtype
    job = _Job(model, opts, plan.make(model, opts, x.shape[0], x.device, sketch=True))
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
    need, have = n * sketch_dim * dtype.itemsize, sizes.device_memory(job.device)
    why = None
    if need > have:  # (an allocator that overcommits would try it)
        why = f"more than the {have / 2**30:.3g} GiB of {job.device}"
    else:
        try:
            S = torch.zeros(n, sketch_dim, dtype=dtype, device=job.device)
        except RuntimeError as e:  # the allocator's failure
            why = f"{type(e).__name__}: {e}"
    if why is not None:
        raise OptionError(
            f"the ({n}, {sketch_dim}) sketch does not fit ({need / 2**30:.3g} GiB of {dtype}; "
            f"{why}): choose a smaller sketch_dim"
        )
    # segments of hashes kept for the next blocks and chunks while they fit in sketch.HASH_BYTES
    kept: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    kept_bytes = 0

    def segment(pname: str, k: int, j: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal kept_bytes
        seg = kept.get((pname, k, j))
        if seg is None:
            seg = tuple(
                t.to(job.device) for t in sketch.segment(seed, pname, k, j, numel, sketch_dim)
            )
            if kept_bytes + 9 * seg[0].numel() <= sketch.HASH_BYTES:
                kept[(pname, k, j)] = seg
                kept_bytes += 9 * seg[0].numel()
        return seg

    def project(key, blk, s0, s1):
        pname, r0, k = key
        G = blk.dense()
        p = job.copies.params[pname]
        c0 = r0 * (p.numel() // capture.rows_of(p))
        c1 = c0 + G.shape[1]
        j0, j1 = c0 // sketch.SEGMENT, (c1 - 1) // sketch.SEGMENT
        segs = [segment(pname, k, j, p.numel()) for j in range(j0, j1 + 1)]
        a, b = c0 - j0 * sketch.SEGMENT, c1 - j0 * sketch.SEGMENT
        if len(segs) == 1:
            h, sgn = segs[0][0][a:b], segs[0][1][a:b]
        else:
            h = torch.cat([t[0] for t in segs])[a:b]
            sgn = torch.cat([t[1] for t in segs])[a:b]
        S[s0:s1].index_add_(1, h, G * sgn)

    chunks = -(-n // samples)
    show = False if progress is None and chunks == 1 else progress
    bar = progress_bar(chunks, "sketch", "chunk", show)  # None: on a terminal
    with _model.model_state(model, bn), _inplace_refused():
        for s0 in range(0, n, samples):
            s1 = min(n, s0 + samples)

            def consume(key, blk, s0=s0, s1=s1):
                with phase("sketch"):
                    project(key, blk, s0, s1)

            try:
                job._run_chunk(x[s0:s1], consume, capture.always)
            except capture.SamplesCoupled as e:
                raise OptionError(
                    f"the sketch needs per-sample independent outputs, but {e}"
                ) from None
            bar.update()
    bar.close()
    if output == "mean":
        S /= math.sqrt(job.head.K)
    if not bool(torch.isfinite(S).all()):
        with _model.model_state(model, bn):  # the diagnosis' forwards in the call's modes
            raise NonFiniteKernelError(job.diagnose_nonfinite(x, None))
    return S


# ---------------------------------------------------------------------------
# The job: one ntk() call.
# ---------------------------------------------------------------------------


class _Job:
    """The state of one call's computation under a plan: the private copies, the output
    head, the probe's measurements and what the first chunk decided for all."""

    def __init__(self, model: nn.Module, opts: options.Options, the_plan: plan.Plan):
        self.model = model
        self.selected = opts.selected
        self.head: Head = Head(opts.output)
        self.bn = opts.bn
        self.dtype = opts.dtype
        self.progress = opts.progress
        self.device = next(iter(self.selected.values())).device
        self.copies: Copies = _model.make_copies(model, self.selected, self.dtype)
        self.workspace = Workspace()
        self.probe: probe.Probe | None = None  # measured sample dims (run_probe)
        self._probed = False
        self._call_dims: dict[tuple[str, int], probe.CallDims | None] = {}
        self.unbatched_calls: set[str] = set()  # modules with a call the probe sent whole
        self._broadcast_ok: dict[str, bool] = {}  # parameter -> takes rules.broadcast
        self._set_plan(the_plan)

    def _set_plan(self, the_plan: plan.Plan) -> None:
        self.plan = the_plan
        self.backend = the_plan.backend
        self.samples, self.cols, self.chunk_n = the_plan.samples, the_plan.cols, the_plan.chunk_n
        self._owners = the_plan.owners
        self.rules = {r.module_name: r.rule for r in the_plan.routes}
        self.plan_modules = [(r.module_name, r.module, dict(r.attrs)) for r in the_plan.routes]
        self.module_of = the_plan.module_of

    def replanned(self, the_plan: plan.Plan) -> _Job:
        """This job (its copies, head and probe) under the plan that takes over."""
        self._set_plan(the_plan)
        return self

    def run_probe(self, x: torch.Tensor) -> None:
        """The probe for the job's first chunk ``x``, once (:mod:`fastntk.engine.probe`)."""
        if not self._probed:
            self._probed = True
            with phase("probe"):
                self.probe = probe.run(
                    self._probe_forward,
                    [(mn, m) for mn, m, _ in self.plan_modules],
                    x,
                    {q: self.copies.params[q] for q in self.selected},
                )

    def _probe_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The (n, K) outputs of a forward of ``x`` alone, each row normalised by itself
        under bn="per_sample" (the probe's forwards)."""
        xp = self._prep(x)
        return self.head(self.copies.call(self.model, xp, samples=_model.ROWS), x.shape[0])

    def call_dims(self, mname, k, args, kwargs, tensors, n) -> probe.CallDims | None:
        """Measured sample dims of ``mname``'s ``k``-th call, fixed by the first chunk
        that makes it (every chunk must serve a call alike: their blocks meet by key)."""
        key = (mname, k)
        if key not in self._call_dims:
            self._call_dims[key] = (
                None
                if self.probe is None
                else self.probe.dims(
                    mname,
                    k,
                    probe.shapes(graph.flatten((args, kwargs))[0]),
                    probe.shapes(tensors),
                    n,
                )
            )
        return self._call_dims[key]

    def row_ranges(
        self, pname: str, rule: GramRule | None, per_sample: int
    ) -> list[tuple[int, int]]:
        """Parameter-row ranges of ``pname``'s blocks (``per_sample`` rows per sample each).

        Sized for the job's largest chunk (``chunk_n``), never the current one: every
        chunk of a job must cut a parameter into the same ranges, since the blocks of two
        chunks meet by key in the panel assembly (a smaller last chunk cut differently
        gave blocks of mismatched widths).
        """
        p = self.copies.params[pname]
        rows = p.shape[0] if p.dim() else 1
        if rule is None or not rule.supports_rows or p.dim() == 0:
            return [(0, rows)]
        nrows = self.chunk_n * per_sample
        per_row = max(1, p.numel() // rows)
        budget = sizes.BLOCK_BYTES if self.cols is None else self.cols * nrows * p.element_size()
        max_rows = max(1, budget // max(1, nrows * per_row * p.element_size()))
        return [(r, min(rows, r + max_rows)) for r in range(0, rows, max_rows)]

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if x.is_floating_point():
            x = x.to(self.dtype).requires_grad_(True)
        return x

    # -- layerwise -------------------------------------------------------------
    def _run_chunk(
        self,
        x: torch.Tensor,
        consume: Callable[[tuple, Block], None],
        streams: Callable[[int], bool] = capture.never,
    ) -> int:
        """Forward + one backward per pass on chunk ``x``; feeds blocks to ``consume``.

        ``streams(nbytes)``: whether ``consume`` has finished with a block of that size
        when it returns (never keeps it), so that the block may live in reused memory.
        Returns the number of passes (rows per sample of the blocks: R).
        """
        self.run_probe(x)
        cap = capture.Capture(self)
        cap.n = x.shape[0]
        cap.consume = consume
        cap.streams = streams
        cap.install()
        try:
            xp = self._prep(x)
            cap.active = True
            with phase("forward"):
                raw = self.copies.call(self.model, xp)
            cap.active = False
            y = self.head(raw, x.shape[0])
            passes = self.head.passes(y)
            self._classify(cap, y)
            roots = ([xp] if xp.requires_grad else []) + cap.roots
            roots += [self.copies.params[p] for p in cap.excluded]
            roots = list({id(t): t for t in roots}.values())
            if self.head.full:
                cap.deferred_params |= {p for r in cap.records for p in r.attrs.values()}
            cap.npasses = len(passes)
            if len(passes) > 1 and not self.head.full:
                grad_bytes = sum(r.out_bytes for r in cap.records if r.rule is not None)
                cap.batch_passes = len(passes) * grad_bytes <= sizes.BATCH_PASSES_BYTES
            for k, w in enumerate(passes):
                cap.pass_idx = k
                if roots and y.requires_grad:
                    with phase("backward"):
                        torch.autograd.grad(
                            y,
                            roots,
                            grad_outputs=w,
                            retain_graph=k < len(passes) - 1,
                            allow_unused=True,
                        )
            if cap.batch_passes:
                cap.flush_batched()
            cap.flush_deferred(len(passes), self.head.full)
        finally:
            cap.active = False
            cap.remove()
            cap.release()
        if cap.excluded:
            self._root_fallback(x, consume, sorted(cap.excluded), len(passes))
        return len(passes)

    def _classify(self, cap: capture.Capture, y: torch.Tensor) -> None:
        """After the forward: rules whose guard outputs reach ``y`` give way to the
        fallback; find multi-use parameters and uses no hook saw."""
        cap.check_guards(y)
        if not hasattr(self, "_untracked"):
            if self.probe is not None:
                coupled = self.probe.coupled(y)
            else:  # the model ran on the chunk but not on one or two of its samples (it
                coupled = (  # groups them, say): independence unchecked, so not assumed
                    "the model does not run on one or two samples, so their independence "
                    "could not be checked"
                )
            if coupled is not None:
                raise capture.SamplesCoupled(coupled)
            self._first_calls = self._calls(cap)
            self._untracked, self._adopted = self._outside_uses(cap, y, self._first_calls)
        elif (calls := self._calls(cap)) != self._first_calls:
            # this chunk calls the modules otherwise than the first (a forward that
            # branches on the batch size, data-dependent calls): its parameters must be
            # served as the first chunk's were, or their blocks would not meet
            untracked, adopted = self._outside_uses(cap, y, calls)
            changed = sorted((untracked ^ self._untracked) | (set(adopted) ^ set(self._adopted)))
            if changed:
                raise UnsupportedError(
                    f"the model uses {', '.join(changed)} inside and outside its module's call "
                    f"in different chunks (a chunk of {cap.n} samples against the first one): "
                    "its forward depends on the batch. Pass chunk_size >= the number of "
                    "samples (one chunk), or use method='vmap'"
                )
        for rec in cap.records:  # adopted parameters join their ancestor's fallback
            extra = {a: p for p, (mn, a) in self._adopted.items() if mn == rec.mname}
            if extra:
                rec.attrs = {**rec.attrs, **extra}
        cap.excluded = set(self._untracked)
        self._hook_broadcasts(cap, y)
        for pname, c in self._calls(cap).items():
            if c > 1 and pname not in cap.excluded:
                cap.deferred_params.add(pname)
        for rec in cap.records:
            rec.graph = None  # (the walks are done)

    def _hook_broadcasts(self, cap: capture.Capture, y: torch.Tensor) -> None:
        """Parameters whose one use is a broadcast over the batch (ViT position embeddings,
        class tokens): hook that autograd node with
        :class:`~fastntk.rules.broadcast.BroadcastRule` instead of the model fallback (used
        outside module calls) or a module fallback (a direct parameter of a module without
        a rule, e.g. the model itself: that fallback re-runs the whole model per sample)."""
        from fastntk.rules import broadcast

        by_fallback: dict[str, list[capture.Record]] = defaultdict(list)
        for rec in cap.records:
            for q in rec.attrs.values():
                by_fallback[q].append(rec)
        candidates = set(cap.excluded) | {
            q for q, recs in by_fallback.items() if len(recs) == 1 and recs[0].rule is None
        }
        if not candidates:
            return
        uses = graph.param_consumers(y, {q: self.copies.params[q] for q in candidates})
        owners = self._owners
        n = y.shape[0]
        for pname, lst in uses.items():
            if len(lst) != 1 or len(owners.get(pname, ())) != 1:
                continue
            node, i = lst[0]
            p = self.copies.params[pname]
            alpha = broadcast.eligible(node, i, tuple(p.shape), n)
            out = tuple(node._input_metadata[0].shape)
            if pname not in self._broadcast_ok:  # decided by the first chunk, for all
                self._broadcast_ok[pname] = self.probe is None or self.probe.batch_first_use(
                    pname, out, n
                )  # (the probe: is dim 0 of that node the samples' dim?)
            if alpha is None or not self._broadcast_ok[pname]:
                continue
            mname, module, attr = owners[pname][0]
            rec = capture.Record(
                len(cap.records), mname, module, capture.BROADCAST_RULE, {attr: pname},
                (tuple(p.shape), alpha), n,
            )  # fmt: skip
            out = tuple(node._input_metadata[0].shape)
            rec.out_specs = [(torch.Size(out), p.dtype, p.device)]
            cap.records.append(rec)
            node.register_prehook(cap._make_prehook(rec, 0, 0))
            cap.roots.append(p)  # the backward must run the node (a class token's expand)
            cap.excluded.discard(pname)
            cap.broadcast.add(pname)
            for fb in by_fallback.get(pname, ()):  # its module's fallback no longer takes it
                fb.attrs = {a: q for a, q in fb.attrs.items() if q != pname}

    def _outside_uses(self, cap: capture.Capture, y: torch.Tensor, calls: dict[str, int]):
        """(parameters used outside their modules' calls: the whole-model fallback,
        parameters of never-called modules an ancestor's call takes: _adoptions)."""
        consumers = graph.param_consumers(y, {q: self.copies.params[q] for q in self.selected})
        uses = {p: len(v) for p, v in consumers.items()}
        untracked = {p for p, c in uses.items() if c > calls.get(p, 0)}
        untracked |= self._uses_outside_calls(cap, consumers, calls)
        adopted = self._adoptions(cap, uses, calls)
        return untracked - set(adopted), adopted

    def _uses_outside_calls(
        self, cap: capture.Capture, consumers, calls: dict[str, int]
    ) -> set[str]:
        """Parameters with a use outside every call of their modules, though counted no
        more often than those calls (a parameter its module holds but only the parent
        uses: ``self.h(self.b(x) * self.b.gamma)``; the module's fallback would re-run a
        forward without it). A use is inside a call when the autograd graph reaches it
        from the call's outputs without passing the call's inputs. ``consumers`` (the
        uses in the graph of the output, from :func:`graph.param_consumers`) holds their
        nodes alive, so node identities compare across the walks."""
        inside: dict[str, set[tuple[int, int]]] = defaultdict(set)
        for rec in cap.records:
            want = {id(self.copies.params[p]): p for p in rec.attrs.values()}
            if rec.graph is None or not want:
                continue
            outs, ins = rec.graph
            stop = {id(node) for node in ins}
            seen: dict[int, Any] = {}  # (alive while the walk lasts: _graph_nodes)
            stack = list(outs)
            while stack:
                node = stack.pop()
                if node is None or id(node) in seen or id(node) in stop:
                    continue
                seen[id(node)] = node
                for i, (nxt, _) in enumerate(getattr(node, "next_functions", ())):
                    var = getattr(nxt, "variable", None)
                    if var is not None:
                        if id(var) in want:
                            inside[want[id(var)]].add((id(node), i))
                    elif nxt is not None:
                        stack.append(nxt)
        return {
            p for p, lst in consumers.items()
            if calls.get(p, 0) and any((id(node), i) not in inside[p] for node, i in lst)
        }  # fmt: skip

    @staticmethod
    def _calls(cap: capture.Capture) -> dict[str, int]:
        calls: dict[str, int] = defaultdict(int)
        for rec in cap.records:
            for pname in rec.attrs.values():
                calls[pname] += 1
        return calls

    def _adoptions(
        self, cap: capture.Capture, uses: dict[str, int], calls: dict[str, int]
    ) -> dict[str, tuple[str, str]]:
        """Parameters of never-called submodules that an ancestor's call can take.

        ``nn.MultiheadAttention`` applies ``out_proj``'s weight with ``F.linear`` and never
        calls ``out_proj``: its parameters are used inside the attention module's own call.
        When a parameter's only owner module is never called, the nearest called ancestor
        is called exactly as often as the parameter is used, and each of its calls can
        take the parameter (the per-module fallback always can; a rule can when its
        ``param_names`` list the attribute path, as ``MultiheadAttentionRule`` lists
        ``out_proj.weight``), the ancestor's records compute its per-sample gradients too
        (instead of a whole-model fallback). Returns
        ``{param: (ancestor module name, attribute path relative to it)}``.
        """
        owners = self._owners
        by_module: dict[str, list[capture.Record]] = defaultdict(list)
        for rec in cap.records:
            by_module[rec.mname].append(rec)
        out: dict[str, tuple[str, str]] = {}
        for pname, n_uses in uses.items():
            if calls.get(pname, 0) or len(owners.get(pname, ())) != 1:
                continue
            mname, _, attr = owners[pname][0]
            if mname in by_module:
                continue
            parts = mname.split(".") if mname else []
            for i in range(len(parts) - 1, -1, -1):
                anc = ".".join(parts[:i])
                if anc in by_module:
                    rel = ".".join(parts[i:] + [attr])
                    recs = by_module[anc]
                    takes = all(r.rule is None or rel in r.rule.param_names for r in recs)
                    if len(recs) == n_uses and takes:
                        out[pname] = (anc, rel)
                    break
        return out

    def _root_fallback(self, x, consume, pnames, npasses) -> None:
        """Per-sample gradients of ``pnames`` through the whole model (torch.func)."""
        with phase("fallback"):
            J = self._vmap_jac(x, pnames)  # pname -> (n, P_k, *shape) per pass rows
        for pname in pnames:
            G = J[pname]  # (n, npasses, cols)
            if self.head.full:
                consume((pname, 0, 0), Dense(G.transpose(0, 1).reshape(-1, G.shape[-1])))
            else:
                for k in range(npasses):
                    consume((pname, 0, k), Dense(G[:, k]))

    def layerwise(self, x1: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        if x2 is None and n1 <= self.samples:
            return self._single_self(x1)
        if x2 is not None and n1 + n2 <= self.samples:
            return self._single_cross(x1, x2)
        return self._panels(x1, x2)

    def _alloc(self, n1: int, n2: int, R: int) -> torch.Tensor:
        return torch.zeros(R * n1, R * n2, dtype=self.dtype, device=self.device)

    def _single_self(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        acc = gram.GramAccumulator(self, n, n, None)
        self._run_chunk(x, acc.add, acc.streams)
        return self.head.finish(acc.result(), n, n)

    def _single_cross(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        n1, n2 = x1.shape[0], x2.shape[0]
        acc = gram.GramAccumulator(self, n1, n2, n1)
        self._run_chunk(torch.cat([x1, x2]), acc.add, acc.streams)
        return self.head.finish(acc.result(), n1, n2)

    def _panel_bytes_per_sample(self, x: torch.Tensor) -> int:
        """Bytes of one sample's per-sample gradients over all backward passes (K for
        "trace", "mean" and "full", else 1; K from a forward of the first chunk when no
        chunk has run yet: the model may not run on fewer samples, e.g. one that groups
        them)."""
        passes = 1
        if not self.head.one_pass:
            if not self.head.K:
                xs = self._prep(x[: min(self.samples, x.shape[0])])
                with torch.no_grad():
                    self.head.passes(
                        self.head(self.copies.call(self.model, xs, samples=_model.ROWS))
                    )
            passes = max(1, self.head.K)
        return sum(p.numel() for p in self.selected.values()) * self.dtype.itemsize * passes

    def _panel_rows(self, x: torch.Tensor) -> tuple[int, int]:
        """(rows of a panel, bytes of one sample's per-sample gradients): as many rows,
        in whole chunks, as the panel budget holds, of every backward pass (the K passes
        of "trace"/"mean" are kept alike: counting one made a "trace" panel hold K times
        the budget)."""
        c = self.samples
        per_sample = max(1, self._panel_bytes_per_sample(x))
        return max(c, (sizes.panel_budget(self.device) // per_sample) // c * c), per_sample

    def _panels(self, x1: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
        """Blockwise assembly for batches larger than one sample chunk."""
        sym = x2 is None
        xb = x1 if sym else x2
        n1, n2 = x1.shape[0], xb.shape[0]
        c = self.samples
        panel, _ = self._panel_rows(x1)
        col_chunks = [(s, min(n2, s + c)) for s in range(0, n2, c)]
        panels = [(s, min(n1, s + panel)) for s in range(0, n1, panel)]
        theta: torch.Tensor | None = None
        total = sum(-(-(p1 - p0) // c) for p0, p1 in panels) + sum(
            len([b for b in col_chunks if not sym or b[0] >= p1]) for _, p1 in panels
        )
        show = False if self.progress is None and total <= 2 else self.progress
        bar = progress_bar(total, "ntk", "chunk", show)  # None: on a terminal

        for p0, p1 in panels:
            store: dict[tuple, list[Block]] = defaultdict(list)
            for s0 in range(p0, p1, c):
                s1 = min(p1, s0 + c)
                self._run_chunk(x1[s0:s1], lambda k, b, store=store: store[k].append(b))
                bar.update()
            R = self.head.R  # known once a chunk has run
            stored = {k: gram.regroup(v, R) for k, v in store.items()}  # rows (R, panel)
            store = None
            if theta is None:
                theta = self._alloc(n1, n2, R)
            t4 = theta.view(R, n1, R, n2)
            if sym:
                blk = sum(gram_block(b, b, self.backend) for b in stored.values())
                if isinstance(blk, torch.Tensor):
                    t4[:, p0:p1, :, p0:p1] += blk.view(R, p1 - p0, R, p1 - p0)
            for b0, b1 in col_chunks:
                if sym and b0 < p1:
                    continue

                def consume(key, blk, b0=b0, b1=b1, stored=stored, t4=t4, p0=p0, p1=p1, R=R):
                    a = stored.get(key)
                    if a is not None:
                        t4[:, p0:p1, :, b0:b1] += gram_block(a, blk, self.backend).view(
                            R, p1 - p0, R, b1 - b0
                        )

                self._run_chunk(xb[b0:b1], consume, capture.always)
                bar.update()
            stored = None
        bar.close()
        assert theta is not None
        if sym:
            R = theta.shape[0] // n1
            t4 = theta.view(R, n1, R, n1)
            for p0, p1 in panels:
                # mirror the blocks right of each diagonal panel into the lower triangle
                t4[:, p1:, :, p0:p1] = t4[:, p0:p1, :, p1:].permute(2, 3, 0, 1)
        return self.head.finish(theta, n1, n2)

    # -- torch.func paths -----------------------------------------------------
    def _vmap_jac(self, x: torch.Tensor, pnames: list[str]) -> dict[str, torch.Tensor]:
        """Per-sample Jacobians of the passes' functions: pname -> (n, npasses, P_p)."""
        copies = self.copies
        head = self.head
        sel = {p: copies.params[p].detach() for p in pnames}
        rest = {k: v.detach() for k, v in copies.params.items() if k not in sel}
        xp = x.detach().to(self.dtype) if x.is_floating_point() else x
        y0 = head(copies.call(self.model, xp[:1], samples=_model.ALONE), 1)
        W = torch.stack(head.passes(y0))[:, 0]  # (npasses, K)

        def f(p, xi):
            with _model.forward_samples(_model.ALONE):
                state = ({**rest, **p}, copies.buffers)
                out = copies.functional(self.model, {**state[0], **state[1]}, (xi.unsqueeze(0),))
            return W @ head(out)[0]  # (npasses,)

        out: dict[str, list[torch.Tensor]] = defaultdict(list)
        for s0 in range(0, xp.shape[0], self.samples):
            with _torch_func("the model"):
                J = vmap(jacrev(f), in_dims=(None, 0))(sel, xp[s0 : s0 + self.samples])
            for p in pnames:
                out[p].append(J[p].reshape(J[p].shape[0], W.shape[0], -1))
        return {p: torch.cat(v) for p, v in out.items()}

    def vmap(self, x1: torch.Tensor, x2: torch.Tensor | None) -> torch.Tensor:
        names = list(self.selected)
        with phase("jacobian"):
            J1 = self._vmap_jac(x1, names)
            J2 = J1 if x2 is None else self._vmap_jac(x2, names)
        return self._from_jacobians(J1, J2, x1.shape[0], (x2 if x2 is not None else x1).shape[0])

    def _from_jacobians(self, J1, J2, n1, n2) -> torch.Tensor:
        with phase("gram"):
            return self._contract(J1, J2, n1, n2)

    def _contract(self, J1, J2, n1, n2) -> torch.Tensor:
        theta = None
        for p in J1:
            A, B = J1[p], J2[p]  # (n, npasses, cols)
            if self.head.full:  # every pair of passes
                count_gram(A.shape[0] * A.shape[1], B.shape[0] * B.shape[1], A.shape[2])
            else:  # matching passes only
                count_gram(A.shape[0], B.shape[0], A.shape[1] * A.shape[2])
            if self.head.full:
                t = torch.einsum("iac,jbc->aibj", A, B)
                part = t.reshape(A.shape[1] * n1, B.shape[1] * n2)
            else:
                part = torch.einsum("iac,jac->ij", A, B)
            theta = part if theta is None else theta + part
        return self.head.finish(theta, n1, n2)

    def coupled(
        self, x1: torch.Tensor, x2: torch.Tensor | None, *, batched: bool, use_vmap: bool = False
    ) -> torch.Tensor:
        """Exact kernel when samples interact: differentiate each sample's outputs
        through the shared batch graph (one forward of the whole batch)."""
        x = x1 if x2 is None else torch.cat([x1, x2])
        n1 = x1.shape[0]
        n = x.shape[0]
        names = list(self.selected)
        xp = x.detach().to(self.dtype) if x.is_floating_point() else x
        with phase("forward"), _model.bn_rows_checked(self.model, self.copies, xp, self.bn):
            raw = self.copies.call(self.model, xp)
        y = self.head(raw, n)
        passes = self.head.passes(y)
        P = len(passes)
        tensors = [self.copies.params[p] for p in names]
        nparams = sum(t.numel() for t in tensors)
        # rows (sample i, pass k): grad_outputs = e_i (x) w_k
        rows = [(i, k) for k in range(P) for i in range(n)]
        per_chunk = max(1, min(len(rows), sizes.JAC_BYTES // max(1, nparams * self.dtype.itemsize)))

        def jac_rows(sub):
            with phase("jacobian"):
                return _jac_rows(sub)

        def _jac_rows(sub):
            if use_vmap or batched:
                E = torch.zeros(len(sub), *y.shape, dtype=y.dtype, device=y.device)
                for r, (i, k) in enumerate(sub):
                    E[r, i] = passes[k][i]
                try:
                    gs = torch.autograd.grad(
                        y,
                        tensors,
                        grad_outputs=E,
                        retain_graph=True,
                        is_grads_batched=True,
                        allow_unused=True,
                    )
                    return torch.cat(
                        [
                            _zeros_if_none(g, t, len(sub)).reshape(len(sub), -1)
                            for g, t in zip(gs, tensors, strict=True)
                        ],
                        1,
                    )
                except RuntimeError:
                    pass  # an op without a batching rule: fall back to a loop
            out = []
            for i, k in sub:
                E = torch.zeros_like(y)
                E[i] = passes[k][i]
                gs = torch.autograd.grad(
                    y, tensors, grad_outputs=E, retain_graph=True, allow_unused=True
                )
                out.append(
                    torch.cat(
                        [_zeros_if_none(g, t).reshape(-1) for g, t in zip(gs, tensors, strict=True)]
                    )
                )
            return torch.stack(out)

        if len(rows) * nparams * self.dtype.itemsize <= 2 * sizes.JAC_BYTES:
            J = torch.cat(
                [jac_rows(rows[s : s + per_chunk]) for s in range(0, len(rows), per_chunk)]
            )
            J = J.view(P, n, -1)
            with phase("gram"):
                if self.head.full:
                    A = J[:, :n1].reshape(P * n1, -1)
                    B = (J if x2 is None else J[:, n1:]).reshape(
                        P * (n - n1 if x2 is not None else n), -1
                    )
                    count_gram(A.shape[0], B.shape[0], A.shape[1])
                    theta = A @ B.T
                else:
                    A = J[:, :n1]
                    B = J if x2 is None else J[:, n1:]
                    count_gram(A.shape[1], B.shape[1], A.shape[0] * A.shape[2])
                    theta = torch.einsum("kic,kjc->ij", A, B)
        else:  # too many rows to hold: panels of rows, recomputing the others
            theta = self._coupled_panels(rows, jac_rows, per_chunk, n1, n, x2 is None, P)
        n2 = n1 if x2 is None else n - n1
        return self.head.finish(theta, n1, n2)

    def _coupled_panels(self, rows, jac_rows, per_chunk, n1, n, sym, P):
        n2 = n1 if sym else n - n1
        R = P if self.head.full else 1
        theta = self._alloc(n1, n2, R).view(R, n1, R, n2)
        left = [(i, k) for (i, k) in rows if i < n1]
        right = [(i, k) for (i, k) in rows if (sym and i < n1) or (not sym and i >= n1)]
        for a0 in range(0, len(left), per_chunk):
            A_rows = left[a0 : a0 + per_chunk]
            A = jac_rows(A_rows)
            for b0 in range(0, len(right), per_chunk):
                B_rows = right[b0 : b0 + per_chunk]
                B = jac_rows(B_rows)
                with phase("gram"):
                    count_gram(A.shape[0], B.shape[0], A.shape[1])
                    blk = A @ B.T
                for ra, (i, ka) in enumerate(A_rows):
                    for rb, (j, kb) in enumerate(B_rows):
                        jj = j if sym else j - n1
                        if self.head.full:
                            theta[ka, i, kb, jj] += blk[ra, rb]
                        elif ka == kb:
                            theta[0, i, 0, jj] += blk[ra, rb]
        return theta.view(R * n1, R * n2)

    # -- diagnosis ---------------------------------------------------------------
    def diagnose_nonfinite(self, x1: torch.Tensor, x2: torch.Tensor | None) -> str:
        """Name the first layer, in forward order, whose gradients are not finite.

        Forward order: the order in which the forward used the parameters (the creation
        order of the autograd nodes that take each parameter, its first use), whatever
        the order in which the model declares them. A NaN or Inf born in the backward
        reaches every layer before it, so this names the earliest of those layers, not
        the one nearest to where the NaN appears.
        """
        owners = self._owners
        for x in (x1, x2):
            if x is None:
                continue
            xp = x.detach().to(self.dtype) if x.is_floating_point() else x
            try:
                y = self.head(self.copies.call(self.model, xp))
            except _model.MergedSamplesError:  # bn="per_sample" on merged samples: no
                return (  # batched forward to diagnose with (the kernel came from vmap)
                    "the kernel is not finite (NaN/Inf); compute it with "
                    "dtype=torch.float64, or check the inputs and the model's initialisation"
                )
            if not bool(torch.isfinite(y).all()):
                return (
                    "the model's output is not finite (NaN/Inf) for some inputs, so the kernel "
                    "is not either; check the inputs and the model's initialisation"
                )
            w = self.head.passes(y)
            names = list(self.selected)
            tensors = [self.copies.params[p] for p in names]
            first_use = {  # autograd numbers its nodes in the order the forward makes them
                p: min(node._sequence_nr() for node, _ in uses)
                for p, uses in graph.param_consumers(
                    y, dict(zip(names, tensors, strict=True))
                ).items()
            }
            bad: set[str] = set()
            for k, wk in enumerate(w):
                gs = torch.autograd.grad(
                    y, tensors, grad_outputs=wk, retain_graph=k < len(w) - 1, allow_unused=True
                )
                for pname, g in zip(names, gs, strict=True):
                    if g is not None and not bool(torch.isfinite(g).all()):
                        bad.add(pname)
            if bad:
                pname = min(bad, key=lambda p: (first_use.get(p, math.inf), names.index(p)))
                mod = owners[pname][0][0] or "<root>"
                return (
                    f"the contribution of layer {mod!r} (parameter {pname!r}) is not "
                    "finite: its gradients contain NaN/Inf"
                )
        return (
            f"the kernel overflowed in {self.dtype} although every layer's gradients are "
            "finite; compute it with dtype=torch.float64"
        )

    # -- module fallback --------------------------------------------------------
    def _output_batch_dims(self, rec, const, diff, flat_args, spec, in_dims, bdim) -> list[int]:
        """The batch dimension of each hooked output of ``rec``'s call.

        One output: the module's (``capture.batch_dim``). Several: found by calling the module on
        its first sample alone and taking, per output, the dimension that is ``n`` in the
        batch call and 1 in that one (``nn.MultiheadAttention(batch_first=False)`` returns
        (T, N, E) outputs but (N, T, S) attention weights).
        """
        if len(rec.out_specs) < 2 or rec.n < 2:
            return [bdim] * len(rec.out_specs)
        one = [
            a.narrow(bdim, 0, 1) if d is not None else a
            for a, d in zip(flat_args, in_dims, strict=True)
        ]
        a, kw = graph.unflatten(one, spec)
        with torch.no_grad():
            out = self.copies.functional(rec.module, {**const, **diff}, a, kw)
        every = graph.tensors(out)
        outs = [every[i] for i in rec.out_pos]
        dims = []
        for j, (sh, _, _) in enumerate(rec.out_specs):
            cand = [
                d for d in range(len(sh))
                if outs[j].dim() == len(sh) and sh[d] == rec.n and outs[j].shape[d] == 1
            ]  # fmt: skip
            dims.append(bdim if bdim in cand or not cand else cand[0])
        return dims

    def fallback_grads(
        self, rec: capture.Record, gouts: list[torch.Tensor | None]
    ) -> dict[str, torch.Tensor]:
        """Exact per-sample gradients of a module's selected parameters via torch.func.

        Re-runs the module on each sample (vmap over the batch dimension, the
        sample kept as a batch of one) and takes the vector-Jacobian product
        with that sample's output gradient.
        """
        module, (args, kwargs) = rec.module, rec.saved
        bdim = capture.batch_dim(module)
        n = rec.n
        prefix = rec.mname + "." if rec.mname else ""
        state = {
            k[len(prefix) :]: v.detach()
            for d in (self.copies.params, self.copies.buffers)
            for k, v in d.items()
            if k.startswith(prefix) or not prefix
        }
        diff = {attr: self.copies.params[p].detach() for attr, p in rec.attrs.items()}
        const = {k: v for k, v in state.items() if k not in diff}
        flat_args, spec = graph.flatten((args, kwargs))
        g_list = [
            g if g is not None else torch.zeros(sh, dtype=dt, device=dev)
            for g, (sh, dt, dev) in zip(gouts, rec.out_specs, strict=True)
        ]
        if rec.dims is not None and probe.AMBIGUOUS not in rec.dims.ins:  # measured
            in_dims = list(rec.dims.ins)
            gdims = [rec.dims.outs[i] for i in rec.out_pos]
        else:  # assumed: the module's batch dim, where a tensor has the batch's size
            in_dims = [
                bdim
                if isinstance(a, torch.Tensor) and a.dim() > bdim and a.shape[bdim] == n
                else None
                for a in flat_args
            ]
            gdims = self._output_batch_dims(rec, const, diff, flat_args, spec, in_dims, bdim)
        out_pos = rec.out_pos

        def f(p, *fa_and_g):
            fa = list(fa_and_g[: len(flat_args)])
            gs = fa_and_g[len(flat_args) :]
            fa = [a.unsqueeze(d) if d is not None else a for a, d in zip(fa, in_dims, strict=True)]
            a, kw = graph.unflatten(fa, spec)
            out = self.copies.functional(module, {**const, **p}, a, kw)
            outs = graph.tensors(out)
            total = 0.0
            for i, g, d in zip(out_pos, gs, gdims, strict=True):
                total = total + (outs[i] * g.unsqueeze(d)).sum()
            return total

        from torch.func import grad

        with _torch_func(f"{rec.mname!r} ({type(module).__name__}, no rule: torch.func fallback)"):
            G = vmap(grad(f), in_dims=(None, *in_dims, *gdims))(diff, *flat_args, *g_list)
        return G


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


class CapturedMutationError(UnsupportedError):
    """torch.func cannot transform a forward that changes a tensor in place which the
    transform does not own (a buffer updated in ``forward``: a running average, a call
    counter). ``ntk``'s layerwise methods then take the batch graph (one backward per sample
    and pass, exact); ``method="vmap"`` and the sketch refuse."""


@contextlib.contextmanager
def _torch_func(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if "mutate a captured Tensor" not in text and "vmap: inplace arithmetic" not in text:
            raise
        raise CapturedMutationError(
            f"torch.func cannot differentiate {what}: its forward changes a tensor in place "
            "that is not an input of the transformed function (a buffer updated in forward, "
            "e.g. a running average); fastntk.ntk with method='auto' or 'loop' computes this "
            "kernel through the batch graph"
        ) from e


def _zeros_if_none(g, t, batch=None):
    if g is not None:
        return g
    shape = t.shape if batch is None else (batch, *t.shape)
    return torch.zeros(shape, dtype=t.dtype, device=t.device)
