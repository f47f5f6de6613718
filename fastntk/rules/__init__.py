"""Per-layer Gram rules: (layer input, output gradient) -> per-sample gradient blocks.

The engine never forms the N x P Jacobian. For every parameterised module it
keeps the module's input during the forward pass; during the backward pass it
receives the gradient of the (reduced) model output with respect to the
module's output, and asks the module's rule for the per-sample gradient of each
parameter, one block of rows of the parameter at a time. Each block is
contracted into the kernel and dropped.

A rule returns a :class:`Block`:

* :class:`Dense` ``G`` of shape ``(n, cols)``: row ``i`` is the flattened
  per-sample gradient of sample ``i`` restricted to the block.
* :class:`Outer` ``(a, b)`` with ``a: (n, p)``, ``b: (n, d)``: the per-sample
  gradient is the outer product ``a_i b_i^T`` (dense layers on 2-D inputs).
  Its Gram is ``(a_A a_B^T) * (b_A b_B^T)``, since
  ``<a_i b_i^T, a_j b_j^T> = <a_i, a_j> <b_i, b_j>``: it costs ``n^2 (p + d)``
  instead of ``n^2 p d`` (the "ghost" Gram). With positions, ``a: (n, T, p)``,
  ``b: (n, T, d)``, the gradient is ``sum_t a_it b_it^T`` (a layer applied at T
  positions) and ``<G_i, G_j> = sum_{t,s} <a_it, a_js> <b_it, b_js>``: ``(nT)^2 (p + d)``
  instead of forming G (``n T p d``) and its Gram (``n^2 p d``); rules return it where
  :func:`outer_pays`.

Register a rule for your own module type with :func:`register_gram_rule`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from fastntk.profiling import count_gram, phase


class Dense(NamedTuple):
    """Per-sample gradients as rows: ``G`` is (n, cols)."""

    G: torch.Tensor

    @property
    def n(self) -> int:
        return self.G.shape[0]

    def dense(self) -> torch.Tensor:
        return self.G


class Outer(NamedTuple):
    """Per-sample gradient ``G_i = a_i b_i^T`` with ``a: (n, p)``, ``b: (n, d)``, or
    ``G_i = sum_t a_it b_it^T`` with ``a: (n, T, p)``, ``b: (n, T, d)`` (T positions)."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def n(self) -> int:
        return self.a.shape[0]

    def dense(self) -> torch.Tensor:
        n = self.a.shape[0]
        if self.a.dim() == 3:
            return torch.bmm(self.a.transpose(1, 2), self.b).reshape(n, -1)
        return (self.a.unsqueeze(2) * self.b.unsqueeze(1)).reshape(n, -1)

    def sq_norms(self) -> torch.Tensor:
        """``|G_i|^2`` for every sample, without forming G: (n,)."""
        if self.a.dim() == 3:  # sum_{t,s} <a_it, a_is> <b_it, b_is>
            aa = torch.bmm(self.a, self.a.transpose(1, 2))
            return (aa * torch.bmm(self.b, self.b.transpose(1, 2))).sum((1, 2))
        return self.a.pow(2).sum(1) * self.b.pow(2).sum(1)


def outer_pays(n: int, T: int, p: int, d: int) -> bool:
    """Whether a layer applied at ``T`` positions (per-sample gradient ``sum_t a_it
    b_it^T``, ``p x d``) should give an :class:`Outer` block with positions rather than
    a dense one, for a chunk of ``n`` samples: its Gram's multiply-adds per pair of
    samples, ``T^2 (p + d)``, against forming the gradients and their symmetric Gram,
    ``p d (T / n + 1/2)``. Forming G is memory-bound at small T, so the count favours
    the dense side: at N=64 on the 2-core CPU, a 128->128 3x3 convolution at 2x2 took
    2.1 ms as an Outer block against 18.5 ms dense (chosen), at 4x4 16.2 against 20.3 ms
    (not chosen), at 8x8 129 against 5.2 ms; a 128->512 Linear on 4 tokens 0.55 against
    3.5 ms (``python bench/bench_engine_choices.py positions``,
    bench/results/engine_choices_cpu.md).
    ``OUTER_COST_FACTOR`` scales the first count: 0 always takes the Outer block, inf
    never."""
    return OUTER_COST_FACTOR * T * T * (p + d) < p * d * (T / max(n, 1) + 0.5)


OUTER_COST_FACTOR = 1.0


# A rule's cap on its blocks where forming them is bound by memory (GramRule.block_cap:
# Linear layers on tokens, a batched matmul over T positions), so that the Gram reads
# each block from the cache it was just written to. "sum", N=64, 2-core CPU, medians of 5,
# two rounds (``python bench/bench_engine_choices.py blocks``, engine_choices_cpu.md): ViT
# 521/496 ms capped against 591/584 without; BERT, T5, Llama, Swin level. The same 4 MiB
# for every layer, convolutions too, cost ResNet 44%, NB201 at N=256 36%.
CACHE_BLOCK_BYTES = 4 * 2**20


# The positional ghost Gram in slabs of A's samples whose two (slab·T, n_B·T) products
# take at most this many bytes.
OUTER_SLAB_BYTES = 32 * 2**20


Block = Dense | Outer


# Dense Grams at least this wide go to the C++ extension's kernels under method="auto" on
# the CPU. Symmetric blocks (upper-triangle tiles: half the FLOPs of ``a @ a.T``): with the
# AVX-512 tiles 1.7-2.6x faster than torch.mm from 2,304 to 36,864 columns at N = 32-1,280
# in float32 and float64, 1.2x (float32) and 1.9x (float64) at 256, slower at 64 columns
# where the call overhead dominates. Cross blocks of at most CSRC_CROSS_MAX_PAIRS entries:
# 1.04-2.25x faster than torch.mm from 2,304 columns (N1 x N2 from 32 x 16 to 512 x 256);
# at 1,280 x 640 x 36,864 the C++ kernel loses in float64 (0.84x), so larger cross blocks
# stay on torch.mm (python bench/bench_engine_choices.py gram; 2-core AMD EPYC,
# bench/results/engine_choices_cpu.md).
CSRC_GRAM_MIN_COLS = 256
CSRC_CROSS_MIN_COLS = 2304
CSRC_CROSS_MAX_PAIRS = 512 * 256


def same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same tensor's data (the engine hands rules detached
    views: compare memory, not objects): one storage, offset, layout, dtype and device."""
    return (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
        and a.dtype == b.dtype and a.device == b.device
    )  # fmt: skip


def gram_block(A: Block, B: Block, backend: str = "torch") -> torch.Tensor:
    """``<G_A_i, G_B_j>`` for all pairs: (n_A, n_B).

    ``backend="triton"`` computes dense Grams with fastntk's Triton kernel
    (upper-triangle tiles only when ``A is B``). ``"auto"`` uses the C++ extension's
    kernels, where it is built, for dense float32/float64 blocks on the CPU within the
    bounds where they measured faster (``CSRC_GRAM_MIN_COLS``, ``CSRC_CROSS_MIN_COLS``,
    ``CSRC_CROSS_MAX_PAIRS``); ``"csrc"`` for every dense float32/float64 block, on the
    CPU and, with a CUDA build, on a GPU.
    """
    with phase("gram"):
        if isinstance(A, Outer) and isinstance(B, Outer) and A.a.dim() == B.a.dim():
            if A.a.dim() == 2:
                count_gram(A.n, B.n, A.a.shape[1] + A.b.shape[1])
                return (A.a @ B.a.T) * (A.b @ B.b.T)
            return _outer_gram(A, B)
        a = A.dense()
        b = a if A is B else B.dense()
        count_gram(a.shape[0], b.shape[0], a.shape[1])
        if backend == "triton":
            from fastntk.kernels.gram import gram

            return gram(a, None if A is B else b)
        if backend in ("auto", "csrc") and _csrc_gram_applies(a, b, backend):
            from fastntk import _ext

            out = a.new_zeros(a.shape[0], b.shape[0])
            if A is B:
                return _ext.gram_sym(a, out)
            return _ext.gram_cross(a, b, out)
        return a @ b.T


def _outer_gram(A: Outer, B: Outer) -> torch.Tensor:
    """The Gram of two Outer blocks with positions, in slabs of A's samples."""
    nA, T, p = A.a.shape
    nB, S, d = B.a.shape[0], B.a.shape[1], A.b.shape[2]
    count_gram(nA * T, nB * S, p + d)
    aB, bB = B.a.reshape(nB * S, p), B.b.reshape(nB * S, d)
    out = A.a.new_empty(nA, nB)
    slab = max(1, OUTER_SLAB_BYTES // (2 * T * nB * S * A.a.element_size()))
    for i0 in range(0, nA, slab):
        i1 = min(nA, i0 + slab)
        prod = A.a[i0:i1].reshape(-1, p) @ aB.T
        prod *= A.b[i0:i1].reshape(-1, d) @ bB.T
        out[i0:i1] = prod.view(i1 - i0, T, nB, S).sum((1, 3))
    return out


def _csrc_gram_applies(a: torch.Tensor, b: torch.Tensor, backend: str) -> bool:
    if a.dtype not in (torch.float32, torch.float64):
        return False
    from fastntk import _ext

    if a.device.type == "cuda":
        # The CUDA build's kernels are unmeasured on a GPU: only backend "csrc" takes them.
        return backend == "csrc" and _ext.cuda_available()
    if a.device.type != "cpu":
        return False
    if backend == "auto":
        if a is b:
            if a.shape[1] < CSRC_GRAM_MIN_COLS:
                return False
        elif a.shape[1] < CSRC_CROSS_MIN_COLS or a.shape[0] * b.shape[0] > CSRC_CROSS_MAX_PAIRS:
            return False
    return _ext.available()


def cat_blocks(blocks: list[Block]) -> Block:
    """Stack the rows of several blocks of the same parameter slice."""
    if len(blocks) == 1:
        return blocks[0]
    if all(isinstance(b, Outer) for b in blocks):
        return Outer(torch.cat([b.a for b in blocks]), torch.cat([b.b for b in blocks]))
    return Dense(torch.cat([b.dense() for b in blocks]))


def add_blocks(blocks: list[Block]) -> Block:
    """Sum per-sample gradients of several uses of one parameter (tied weights)."""
    if len(blocks) == 1:
        return blocks[0]
    out = blocks[0].dense().clone()
    for b in blocks[1:]:
        out += b.dense()
    return Dense(out)


class Workspace:
    """Reusable scratch memory of one ``ntk()`` call.

    One buffer per tag, grown on demand and handed out again for every layer, so that
    layers of similar size do not each allocate (and page-fault in) fresh memory: with
    glibc's allocator, blocks of several MB are returned to the system when freed and
    faulted in again on the next allocation (``python bench/bench_engine_choices.py
    conv`` shows the page faults per call). A tensor from :meth:`get` stays valid until
    the next :meth:`get` with the same tag.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, tag: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of ``shape`` with ``like``'s dtype and device (contents undefined)."""
        numel = 1
        for v in shape:
            numel *= v
        buf = self._bufs.get(tag)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._bufs[tag] = buf
        return buf[:numel].view(shape)


@dataclass
class Context:
    """What a rule may know about the call it serves.

    Attributes:
        bn: ``"eval"`` or ``"per_sample"`` (``"batch"`` never reaches rules).
        backend: ``"torch"`` (PyTorch ops only: ``method="layerwise"``), ``"auto"``
            (PyTorch ops and the C++ extension where it measured faster), ``"csrc"``
            (the C++ ops wherever they apply: ``method="csrc"``) or ``"triton"``
            (fastntk's Triton kernels: ``method="triton"``).
        workspace: scratch memory reused across the layers of the call (temporaries of a
            rule, e.g. convolution patches), or None.
        params: the module's parameter attributes the kernel needs (``("weight",)``
            when only weights are selected); empty when unknown.
    """

    bn: str
    backend: str = "torch"
    workspace: Workspace | None = None
    params: tuple[str, ...] = ()

    def scratch(self, tag: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A temporary of ``shape``: from the workspace when there is one, else new."""
        if self.workspace is None:
            return like.new_empty(shape)
        return self.workspace.get(tag, shape, like)


class GramRule:
    """Base class of a per-layer rule.

    Subclasses set :attr:`param_names` (the direct parameters they cover) and
    implement :meth:`save` (called in the forward hook) and :meth:`grad_rows`.
    """

    #: direct parameter attribute names this rule computes per-sample gradients for
    param_names: tuple[str, ...] = ()
    #: whether :meth:`grad_rows` supports any row range of the parameter's first dim
    supports_rows: bool = False
    #: whether :meth:`grad_rows` accepts ``out=``: an (n, cols) contiguous tensor to write
    #: the block's per-sample gradients into (the engine passes reused memory for big
    #: blocks it consumes at once). A rule may still return a block of its own.
    supports_out: bool = False

    def covers(self, module: nn.Module) -> bool:
        """Whether this rule applies to this instance (default: yes)."""
        return True

    def accepts(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> bool:
        """Whether this rule serves this call (default: when the input is passed
        positionally, as the rules read it: ``layer(input=x)`` goes to the fallback). A
        declined call goes through the exact per-module fallback."""
        return bool(args)

    def guards(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list:
        """Outputs other than the first that must not reach the kernel's output for this
        rule to be exact (a rule sees the first output's gradient only). After the forward
        the engine checks each against the autograd graph; a call whose guard is reached
        goes through the exact per-module fallback instead (``nn.MultiheadAttention``'s
        attention weights). Default: none."""
        return []

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, ctx: Context) -> Any:
        """Return what the backward needs (references, not copies)."""
        raise NotImplementedError

    def block_cap(self, module: nn.Module, saved: Any) -> int | None:
        """A cap in bytes on one block of this call's per-sample gradients, where forming
        them is bound by memory and the Gram that reads them next should find them in the
        cache (``CACHE_BLOCK_BYTES``); None: the engine's budget. It
        must not depend on the chunk's sample count (every chunk cuts alike)."""
        return None

    def grad_rows(
        self, module: nn.Module, saved: Any, gout: torch.Tensor, name: str, r0: int, r1: int
    ) -> Block:
        """Per-sample gradient of parameter ``name`` restricted to rows ``r0:r1`` of its dim 0.

        Rules with :attr:`supports_out` take a keyword ``out=None`` too.
        """
        raise NotImplementedError

    def grad_rows_multi(
        self, module: nn.Module, saved: Any, gouts: list[torch.Tensor], name: str, r0: int, r1: int
    ) -> list[Block]:
        """:meth:`grad_rows` for several output gradients of the same call (one per logit
        in ``output="trace"``); rules override it to share work across them."""
        return [self.grad_rows(module, saved, g, name, r0, r1) for g in gouts]


_RULES: dict[type, GramRule] = {}


def register_gram_rule(module_type: type) -> Callable[[type], type]:
    """Class decorator registering a :class:`GramRule` subclass for ``module_type``.

    The rule serves instances of ``module_type`` and of subclasses that override
    none of the methods its forward may run: ``forward`` or any other method of
    ``module_type`` and its bases below ``nn.Module``, except those in
    ``NOT_COMPUTATION`` (initialisation, input checks). Any other subclass falls
    back to the exact torch.func path. Registering a type again replaces its rule.

    Example::

        @fastntk.register_gram_rule(MyScale)
        class MyScaleRule(fastntk.rules.GramRule):
            param_names = ("scale",)
            def save(self, module, args, kwargs, output, ctx):
                return args[0]
            def grad_rows(self, module, x, gout, name, r0, r1):
                return fastntk.rules.Dense((gout * x).flatten(2).sum(2)[:, r0:r1])
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_gram_rule expects an nn.Module subclass, got {module_type!r}")

    def deco(rule_cls: type) -> type:
        if not (isinstance(rule_cls, type) and issubclass(rule_cls, GramRule)):
            raise TypeError("register_gram_rule decorates a GramRule subclass")
        _RULES[module_type] = rule_cls()
        return rule_cls

    return deco


# Forwards fastntk itself puts on instances during a call (``_model.model_state``: the
# per-sample BatchNorm, nn.PReLU's); any other forward set on an instance is the user's.
OWN_FORWARDS: set[Any] = set()


# Methods of a rule's module class that do not take part in its computation: a subclass
# may override them and keep the rule (construction and initialisation, input checks, and
# the input rank InstanceNorm1d/2d/3d each declare).
NOT_COMPUTATION = frozenset({
    "__init__", "__setstate__", "reset_parameters", "_reset_parameters", "reset_running_stats",
    "_fill_padding_idx_with_zero", "from_pretrained", "extra_repr", "_load_from_state_dict",
    "_check_input_dim", "_get_no_batch_dim",
})  # fmt: skip
_COMPUTATION: dict[type, frozenset[str]] = {}


def _computation(klass: type) -> frozenset[str]:
    """The methods of ``klass`` and its bases up to ``nn.Module`` that its forward may run
    (``forward``, ``Conv2d._conv_forward``, ``MultiheadAttention.merge_masks``, ...)."""
    names = _COMPUTATION.get(klass)
    if names is None:
        names = frozenset(
            name
            for c in klass.__mro__[: klass.__mro__.index(nn.Module)]
            for name, v in vars(c).items()
            if name not in NOT_COMPUTATION and (callable(v) or isinstance(v, (staticmethod, classmethod)))
        )  # fmt: skip
        _COMPUTATION[klass] = names
    return names


def find_rule(module: nn.Module) -> GramRule | None:
    """The rule for ``module``: the most specific registered base type whose computation
    the module's class keeps.

    A subclass that overrides any method the registered class's forward may run (its
    ``forward``, or a helper it calls: ``Conv2d._conv_forward`` transforming the weight)
    is another computation: no rule (the exact fallback runs it). So is such a method set
    on the instance (``module.forward = ...``; NASLib and zero-cost-nas turn BatchNorm
    into an identity this way), except fastntk's own temporary forwards."""
    own = module.__dict__
    cls = type(module)
    for klass in cls.__mro__:
        rule = _RULES.get(klass)
        if rule is None:
            continue
        for name in _computation(klass):
            if name in own and not (
                name == "forward" and getattr(own[name], "__func__", own[name]) in OWN_FORWARDS
            ):
                return None  # set on the instance
            if inspect.getattr_static(cls, name) is not inspect.getattr_static(klass, name):
                return None  # a subclass changed the computation: no factorised rule applies
        return rule if rule.covers(module) else None
    return None


# Register the built-in rules.
from fastntk.rules import attention, conv, embedding, linear, norm  # noqa: E402,F401

__all__ = [
    "Block",
    "Context",
    "Dense",
    "GramRule",
    "Outer",
    "Workspace",
    "add_blocks",
    "cat_blocks",
    "find_rule",
    "gram_block",
    "outer_pays",
    "register_gram_rule",
    "same_data",
]
