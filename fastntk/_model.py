"""Model-side plumbing shared by every method: parameter selection, private
copies of the parameters and buffers, train/eval modes, output reduction.

The engine never runs the user's parameters or buffers: every forward goes
through ``torch.func.functional_call`` with private copies (their own storage,
cast to the computation dtype, ``requires_grad`` set only on the selected ones;
so a train-mode BatchNorm updates the copy, not the user's running statistics,
and a forward editing a weight in place edits the copy). Module train/eval
flags and the per-sample BatchNorm forward are changed for the duration of a
call and restored in a ``finally`` block by :func:`model_state` (Ctrl-C held
back while it restores; every parameter and buffer slot put back as it was).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import signal
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from fastntk.errors import (
    InputError,
    InputTypeError,
    OptionError,
    ParameterSelectionError,
    UnsupportedError,
)
from fastntk import rules as _rules
from fastntk.rules.norm import per_sample_batchnorm

BN_MODES = ("eval", "batch", "per_sample")
OUTPUT_MODES = ("sum", "trace", "mean", "full")

ParamSpec = None | list[str] | tuple[str, ...] | Callable[[str, nn.Parameter], bool]


def select_params(model: nn.Module, params: ParamSpec) -> dict[str, nn.Parameter]:
    """Resolve the ``params`` argument to ``{canonical name: parameter}``.

    Canonical names are those of ``model.named_parameters()`` (a parameter
    registered under several names, i.e. tied, appears once).
    """
    named = dict(model.named_parameters())
    if params is None:
        sel = {n: p for n, p in named.items() if p.requires_grad}
        if not sel:
            raise ParameterSelectionError(
                "no parameter of the model requires grad; pass params=[names] or a "
                "predicate to choose which parameters define the kernel"
            )
        return sel
    if callable(params):
        sel = {n: p for n, p in named.items() if params(n, p)}
        if not sel:
            raise ParameterSelectionError(
                "the params predicate selected no parameter; it receives (name, parameter) "
                f"with names such as {list(named)[:3]}"
            )
        return sel
    if isinstance(params, str):
        raise ParameterSelectionError(
            f"params must be a list of names, a predicate or None, not the string {params!r}"
        )
    aliases = dict(model.named_parameters(remove_duplicate=False))
    canon = {id(p): n for n, p in named.items()}
    sel = {}
    for name in params:
        if name not in aliases:
            close = difflib.get_close_matches(str(name), list(aliases), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ParameterSelectionError(f"the model has no parameter named {name!r}{hint}")
        p = aliases[name]
        sel[canon[id(p)]] = p
    if not sel:
        raise ParameterSelectionError("params is an empty list: select at least one parameter")
    return sel


def check_progress(progress: Any) -> None:
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise OptionError(f"progress must be True, False or None (the default), got {progress!r}")


def check_inputs(model: nn.Module, x1: Any, x2: Any) -> None:
    """Typed errors for unusable inputs (and models: :func:`check_model`)."""
    check_model(model)
    for nm, x in (("x1", x1), ("x2", x2)):
        if x is None and nm == "x2":
            continue
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(
                f"{nm} must be a torch.Tensor with the batch in dim 0, got {type(x)}"
            )
        if x.dim() == 0:
            raise InputError(f"{nm} is a scalar; pass a batch of shape (N, ...)")
        if x.shape[0] == 0:
            raise InputError(
                f"{nm} is an empty batch (shape {tuple(x.shape)}); pass at least one sample"
            )
        if not (x.is_floating_point() or _is_index(x)):
            raise InputTypeError(f"{nm} has dtype {x.dtype}; pass floating-point inputs")
        if _is_index(x) and not any(isinstance(m, _EMBEDDINGS) for m in model.modules()):
            raise InputTypeError(
                f"{nm} has dtype {x.dtype}, but the model has no nn.Embedding or "
                "nn.EmbeddingBag to take indices; "
                "pass floating-point inputs (for uint8 images: x.float() / 255, then normalise)"
            )
    if x2 is not None:
        if x1.shape[1:] != x2.shape[1:]:
            raise InputError(
                f"x1 and x2 must have the same per-sample shape, got {tuple(x1.shape[1:])} "
                f"and {tuple(x2.shape[1:])}"
            )
        if x1.dtype != x2.dtype:
            raise InputTypeError(f"x1 and x2 have different dtypes ({x1.dtype}, {x2.dtype})")
    p = next(iter(model.parameters()), None)
    if p is not None:
        for nm, x in (("x1", x1), ("x2", x2)):
            if x is not None and x.device != p.device:
                raise InputError(
                    f"{nm} is on {x.device} but the model's parameters are on {p.device}; "
                    "move them to the same device"
                )


_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def resolve_dtype(dtype: Any, model: nn.Module, selected: dict[str, torch.Tensor]) -> torch.dtype:
    """The computation dtype: ``dtype`` checked (a real floating-point torch.dtype), or
    the parameters' own (:func:`default_dtype`)."""
    if dtype is None:
        return default_dtype(model, selected)
    if not isinstance(dtype, torch.dtype):
        raise OptionError(
            f"dtype must be a torch.dtype such as torch.float64, got {dtype!r} "
            f"({type(dtype).__name__})"
        )
    if not dtype.is_floating_point:
        raise OptionError(f"dtype must be a real floating-point dtype (torch.float32/float64), "
                          f"got {dtype}")  # fmt: skip
    return dtype


def default_dtype(model: nn.Module, selected: dict[str, torch.Tensor]) -> torch.dtype:
    """The computation dtype when the caller gives none: the parameters' own dtype.

    Raises InputTypeError when the floating-point parameters have several dtypes (every
    copy is cast to the computation dtype, and a layer whose forward casts its input to
    its own dtype would then see mismatched operands).
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        raise InputTypeError(
            f"the model's parameters have several dtypes ({names}); pass dtype= (e.g. "
            "dtype=torch.float64) to compute in one, or convert the model with .to(dtype)"
        )
    return next(iter(selected.values())).dtype


def check_model(model: nn.Module) -> None:
    """Typed errors for modules whose kernel is not the Gram of per-sample gradients.

    Checked before any forward: ``max_norm`` embeddings rewrite the rows they look up in
    place during the forward (the user's table would change, and the function would
    depend on which batches came first); ``scale_grad_by_freq`` scales gradients by
    token counts over the whole batch, which is no per-sample gradient.
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__} (wrap a function of "
            "parameters in an nn.Module that holds them as nn.Parameter)"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedError(
            "a TorchScript module (torch.jit.script / trace) takes no forward hooks nor "
            "torch.func transforms, which fastntk's methods need: pass the eager nn.Module "
            "it was made from"
        )
    for name, m in model.named_modules():
        if not isinstance(m, _EMBEDDINGS):
            continue
        kind = type(m).__name__
        if m.max_norm is not None:
            raise UnsupportedError(
                f"{name or 'the model'} ({kind}) has max_norm={m.max_norm}: its forward "
                "renormalises the looked-up rows of its weight in place, so the kernel would "
                "change the model and depend on the order of the batches. Renormalise the "
                f"table once yourself (torch.embedding_renorm_ under torch.no_grad()) and "
                "set max_norm=None"
            )
        if m.scale_grad_by_freq:
            raise UnsupportedError(
                f"{name or 'the model'} ({kind}) has scale_grad_by_freq=True: its gradients "
                "are scaled by token counts over the whole batch, not per sample, so there "
                "is no per-sample gradient to take the NTK of; set scale_grad_by_freq=False"
            )


def with_grad(fn):
    """Runs ``fn`` with gradients on, also when called under ``torch.no_grad()`` or
    ``torch.inference_mode()`` (NAS scoring code often is): the kernel is made of
    gradients, and without them the backward passes never ran (a zero kernel)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapped


def plain(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` as an ordinary tensor: an inference-mode tensor (made under
    ``torch.inference_mode()``) cannot be saved for the backward, so it is copied."""
    if x is not None and x.is_inference():
        with torch.inference_mode(False):
            return x.clone()
    return x


def _is_index(x: torch.Tensor) -> bool:
    return x.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_options(output: Any, bn: str, method: str, methods: tuple[str, ...]) -> None:
    if bn not in BN_MODES:
        raise OptionError(f"unknown bn={bn!r}; choose one of {BN_MODES}")
    if method not in methods:
        raise OptionError(f"unknown method={method!r}; choose one of {methods}")
    if isinstance(output, bool) or not (
        output in OUTPUT_MODES or isinstance(output, int) or callable(output)
    ):
        raise OptionError(
            f"unknown output={output!r}; choose one of {OUTPUT_MODES}, an int (one logit) "
            "or a callable mapping the model's output to one value per sample"
        )


@dataclass
class Head:
    """Reduction of the model's raw output to the (n, K) matrix the kernel is built from.

    ``passes`` lists the output weightings that define per-sample scalar
    functions: the kernel of pass ``w`` is the NTK of ``sum_k w_k f_k(x)``.
    ``"sum"``: one pass of ones; an int: one one-hot pass; ``"trace"``,
    ``"mean"``, ``"full"``: one pass per logit (``"full"`` keeps the cross
    terms between passes).
    """

    output: Any
    K: int = 0

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
        n, K = y.shape
        self.K = K
        if self.one_pass:
            return [torch.ones_like(y)]
        eye = torch.eye(K, dtype=y.dtype, device=y.device)
        return [eye[k].expand(n, K) for k in range(K)]

    @property
    def full(self) -> bool:
        return self.output == "full"

    @property
    def R(self) -> int:
        """Rows per sample in the kernel: K for "full", else 1."""
        return self.K if self.full else 1

    def finish(self, theta: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
        """(R*n1, R*n2) accumulator -> the kernel the user asked for."""
        if self.full:
            K = self.K
            return theta.view(K, n1, K, n2).permute(1, 3, 0, 2).contiguous()
        if self.output == "mean":
            theta = theta / self.K
        return theta


@dataclass
class Copies:
    """Private parameters and buffers the forward runs with."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    selected: dict[str, torch.Tensor] = field(default_factory=dict)

    # module id -> its (module.attribute slot, canonical name) pairs, made once per call:
    # the structure cannot change while the copies live (one ntk call)
    _slots: dict[int, list[tuple[str, str]]] = field(default_factory=dict, repr=False)

    def call(self, model: nn.Module, x: torch.Tensor, *, samples: int | str | None = None) -> Any:
        """``model(x)`` with the copies; ``samples``, what ``x`` holds for bn="per_sample"
        (:func:`forward_samples`), is by default a sample per row of dim 0."""
        with forward_samples(x.shape[0] if samples is None else samples):
            return self.functional(model, {**self.params, **self.buffers}, (x,))

    def functional(
        self, module: nn.Module, tensors: dict[str, torch.Tensor], args: Any,
        kwargs: dict | None = None,
    ) -> Any:  # fmt: skip
        """``module(*args, **kwargs)`` with ``tensors`` (by canonical name, as
        ``named_parameters()`` / ``named_buffers()`` give them) in place of its own.

        Every (module, attribute) slot is swapped exactly once: a parameter tied to several
        modules reaches each of them, and a submodule registered under two names (a
        ``ModuleList([blk, blk])``) is swapped once. torch.func's ``tie_weights=True``
        swapped such an aliased slot twice and restored it to the copy, so a plain call
        left fastntk's private tensors in the user's model.
        """
        if id(module) not in self._slots:
            self._slots[id(module)] = _slot_names(module)
        slots, used = {}, set()
        for slot, name in self._slots[id(module)]:
            if name in tensors:
                slots[slot] = tensors[name]
                used.add(name)
        slots.update({n: t for n, t in tensors.items() if n not in used})  # torch.func judges
        return functional_call(module, slots, args, kwargs, tie_weights=False)


def _slot_names(module: nn.Module) -> list[tuple[str, str]]:
    """``(slot, canonical name)`` for every (module, attribute) slot of ``module`` that
    holds a parameter or buffer, each slot once (an aliased submodule under one name)."""
    canon = {id(t): n for n, t in module.named_parameters()}
    canon.update({id(t): n for n, t in module.named_buffers()})
    out: list[tuple[str, str]] = []
    seen: set[tuple[int, str]] = set()
    for mname, mod in module.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for attr, t in store.items():
                if t is None or (id(mod), attr) in seen or id(t) not in canon:
                    continue
                seen.add((id(mod), attr))
                out.append((f"{mname}.{attr}" if mname else attr, canon[id(t)]))
    return out


def make_copies(model: nn.Module, selected: dict[str, nn.Parameter], dtype: torch.dtype) -> Copies:
    params = {}
    for n, p in model.named_parameters():
        t = p.detach()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        else:  # own storage: a forward that edits a parameter in place (a clamp_ under
            t = t.clone()  # no_grad) edits this copy, not the user's parameter
        params[n] = t.requires_grad_(n in selected)
    buffers = {}
    for n, b in model.named_buffers():
        t = b.detach().clone()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        buffers[n] = t
    return Copies(params, buffers, {n: params[n] for n in selected})


class MergedSamplesError(UnsupportedError):
    """bn="per_sample": a BatchNorm's rows are not the forward's samples (``what`` says
    how); the message gives the advice."""

    def __init__(self, what: str):
        super().__init__(
            f"bn='per_sample' normalises each sample by its own statistics, but {what}: "
            "method='auto', 'loop' or 'vmap' runs each sample alone (exact); the layerwise "
            "methods need bn='eval' or 'batch'"
        )


# What the forward running now is made of, for bn="per_sample": the number of samples
# (a batch along dim 0: each of a BatchNorm's rows must be one of them), ALONE (one
# sample, all rows its own: a function vmapped over the samples, as vmap(jacrev) sees the
# model) or ROWS (each row normalised by itself, unchecked: the probe, which only measures
# shapes, and a rule re-running one module on its samples' rows; also the default).
ALONE, ROWS = "alone", "rows"
_FORWARD_SAMPLES: contextvars.ContextVar[int | str] = contextvars.ContextVar(
    "fastntk_forward_samples", default=ROWS
)


@contextlib.contextmanager
def forward_samples(n: int | str) -> Iterator[None]:
    token = _FORWARD_SAMPLES.set(n)
    try:
        yield
    finally:
        _FORWARD_SAMPLES.reset(token)


def clear_backward_hooks(module: nn.Module) -> None:
    """Drop ``module``'s own backward hooks (the caller keeps the dicts to restore them)."""
    module._backward_hooks, module._backward_pre_hooks = OrderedDict(), OrderedDict()
    module._is_full_backward_hook = None


class OneValuePerChannelError(MergedSamplesError):
    """bn="per_sample": a batched forward gives a BatchNorm one value per channel in each
    row. If the rows are the samples, the per-sample statistics are degenerate; if not (time
    steps as rows, T = N), only a forward of each sample alone can tell: "auto" and "loop"
    take it (and raise the plain :class:`UnsupportedError` where the sample alone has one
    value per channel too)."""

    def __init__(self, module: nn.Module, shape: tuple[int, ...]):
        UnsupportedError.__init__(
            self,
            f"bn='per_sample': a {type(module).__name__} gets one value per channel per sample "
            f"(input {shape}); if its rows are the samples, each is normalised to 0 by its own "
            "statistics (PyTorch refuses a train-mode BatchNorm on one such sample): use "
            "bn='eval' (running statistics) or bn='batch'; if they are not (time steps as "
            "rows), method='auto', 'loop' or 'vmap' runs each sample alone",
        )


def _degenerate(self: nn.Module, x: torch.Tensor) -> UnsupportedError:
    return UnsupportedError(
        f"bn='per_sample': a {type(self).__name__} gets one value per channel per sample "
        f"(input {tuple(x.shape)} for one sample), which its own statistics normalise to 0 "
        "whatever the input, so nothing before it reaches the kernel (PyTorch refuses a "
        "train-mode BatchNorm on one such sample); use bn='eval' (running statistics) or "
        "bn='batch'"
    )


def _per_sample_bn_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    n = _FORWARD_SAMPLES.get()
    if n == ALONE:  # one sample: its statistics over all its rows and positions
        if x.numel() <= x.shape[1]:
            raise _degenerate(self, x)
        y = per_sample_batchnorm(self, x, rows_are_samples=False)
    elif n == ROWS or x.shape[0] == n:
        if n != ROWS and x[0].numel() <= x.shape[1]:
            raise OneValuePerChannelError(self, tuple(x.shape))
        y = per_sample_batchnorm(self, x)
    else:
        raise MergedSamplesError(
            f"a {type(self).__name__} is given {x.shape[0]} rows for {n} samples (samples "
            "merged with another dim, e.g. (N*T, C) frames, or no sample dim), and a batched "
            "forward cannot tell which rows are one sample's"
        )
    if self.weight is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = y * self.weight.view(shape) + self.bias.view(shape)
    return y


@contextlib.contextmanager
def _input_shapes(mods: list[nn.Module]) -> Iterator[list[tuple[int, ...]]]:
    """The first input's shape of every call of ``mods`` made inside the block."""
    seen: list[tuple[int, ...]] = []
    hs = [m.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape))) for m in mods]
    try:
        yield seen
    finally:
        for h in hs:
            h.remove()


@contextlib.contextmanager
def bn_rows_checked(model: nn.Module, copies: Copies, x: torch.Tensor, bn: str) -> Iterator[None]:
    """Around a batched forward of ``x`` (the batch graph's, which has no probe): with
    bn="per_sample", refuse BatchNorms whose rows are not the samples. A row count that
    differs from the samples' is caught by the BatchNorm's forward; one that equals it by
    chance (T = N time steps as rows) is caught here, against a forward of one sample:
    each call's dim 0 must hold n rows in the batch and one alone."""
    mods = batchnorms(model) if bn == "per_sample" and x.shape[0] > 1 else []
    if not mods:
        yield
        return
    try:
        with torch.no_grad(), _input_shapes(mods) as alone:
            copies.call(model, x[-1:], samples=ROWS)
    except Exception:  # noqa: BLE001 - a model that cannot run one sample: unchecked
        alone = None
    with _input_shapes(mods) as batch:
        yield
    if alone is None:
        return
    if len(alone) != len(batch) or any(
        b[0] != x.shape[0] or a[0] != 1 or a[1:] != b[1:] for a, b in zip(alone, batch)
    ):
        raise MergedSamplesError(
            "a BatchNorm of this model is given rows that are not its samples (time steps, "
            "or no sample dim)"
        )


def _prelu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``F.prelu(x, weight)`` by ``torch.where``: torch.func's vmap(jacrev) over
    ``F.prelu`` gives wrong Jacobians in torch 2.13 (against per-sample jacrev; or a size
    error: tests/test_engine_edge_cases.py); the same function and gradients (x > 0: 1,
    else the weight, as ``prelu``'s backward) through ops it batches right."""
    w = self.weight
    if w.numel() > 1 and x.dim() >= 2:
        w = w.view((1, -1) + (1,) * (x.dim() - 2))
    elif w.numel() == 1:
        w = w.reshape(())
    return torch.where(x > 0, x, w * x)


_rules.OWN_FORWARDS.update({_per_sample_bn_forward, _prelu_forward})

# BatchNorm forwards bn="per_sample" replaces by per-sample statistics: torch's own
# (SyncBatchNorm's adds only the cross-process reduction of the batch statistics).
_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "?") or "the model"


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recurrent(model: nn.Module) -> str | None:
    """Name of the model's first recurrent module (``nn.RNN``/``GRU``/``LSTM`` or a cell).

    Their fused kernels have no torch.func batching rule (vmap over them fails; a cell
    called without a state makes its zero state inside, which vmap cannot batch), and no
    per-layer rule covers them: the kernel of such a model is taken through the batch
    graph (one backward per sample and pass), exact but without the layerwise speed-up.
    """
    for name, m in model.named_modules():
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            return f"{name or 'the model'} ({type(m).__name__})"
    return None


def is_coupled(model: nn.Module, bn: str) -> bool:
    """Whether samples interact in the forward pass (per-sample factorisation invalid)."""
    if bn == "batch":
        return bool(batchnorms(model))
    if bn == "eval":
        # BatchNorm without running statistics uses batch statistics even in eval mode.
        return any(m.running_mean is None for m in batchnorms(model))
    return False


# One call at a time per module (two threads computing kernels of one model, or of two
# models sharing a block, would each save the other's temporary modes, hook dicts and
# private parameter copies as the user's): a call takes the locks of all its modules, in
# one order for every call (by id: no two calls wait on each other). Process-wide state is
# suspended while any call runs (counted: calls on other models overlap): the module
# backward hooks, and parametrize.cached()'s cache (a weight the user's forward cached
# before the call was used by it: a wrong kernel; the call's own weights, computed from
# fastntk's copies, were left for the user's next forward).
_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_GLOBAL_LOCK = threading.Lock()
_SUSPENDED: dict[str, Any] = {"depth": 0, "saved": None}


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) held back while the block changes or restores the user's state, and
    delivered at its end: a KeyboardInterrupt in the middle of a restore left modules in
    eval mode, their backward hooks gone, or the process-wide hooks lost (helper-26). Only
    in the main thread (where Python runs signal handlers); other signals are not held."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler installed outside Python, which could not be put back)
        return
    got: list[Any] = []
    try:
        old = signal.signal(signal.SIGINT, lambda sig, frame: got.append(frame))
    except (ValueError, TypeError):  # (no signal handling in this interpreter)
        yield
        return
    try:
        yield
    finally:
        if old is not None:  # (getsignal said it was Python's; None cannot be put back)
            signal.signal(signal.SIGINT, old)
        if got:
            if callable(old):
                old(signal.SIGINT, got[0])  # (the default handler raises KeyboardInterrupt)
            elif old == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def locked(model: nn.Module) -> Iterator[None]:
    """The locks of all of ``model``'s modules, taken in one order (by id): while held, no
    fastntk call changes (temporarily) any of them (metrics.kernel_evolution copies the
    model under it: a copy made during another call took that call's modes and forwards)."""
    with _GLOBAL_LOCK:
        locks = [_MODEL_LOCKS.setdefault(m, threading.RLock())
                 for m in sorted(model.modules(), key=id)]  # fmt: skip
    with contextlib.ExitStack() as held:
        for lock in locks:
            held.enter_context(lock)
        yield


@contextlib.contextmanager
def _suspended_process_state() -> Iterator[None]:
    """Process-wide state off for the calls running (counted): the module backward hooks
    (their dicts swapped for empty ones, so a handle removed meanwhile stays removed) and
    parametrize.cached() (its counter lowered by the value found, then raised by it: a
    thread leaving its cached() block meanwhile keeps its count)."""
    from torch.nn.modules import module as _m
    from torch.nn.utils import parametrize

    entered = False
    try:
        with _sigint_deferred(), _GLOBAL_LOCK:  # (a Ctrl-C is delivered inside the try)
            if _SUSPENDED["depth"] == 0:
                _SUSPENDED["saved"] = (
                    _m._global_backward_hooks, _m._global_backward_pre_hooks,
                    parametrize._cache_enabled,
                )  # fmt: skip
                _m._global_backward_hooks, _m._global_backward_pre_hooks = OrderedDict(), OrderedDict()
                parametrize._cache_enabled -= _SUSPENDED["saved"][2]  # computed afresh
            _SUSPENDED["depth"] += 1
            entered = True
        yield
    finally:
        if entered:
            with _sigint_deferred(), _GLOBAL_LOCK:
                _restore_process_state(_m, parametrize)


def _restore_process_state(_m: Any, parametrize: Any) -> None:
    """The last call out puts the process-wide state back (under _GLOBAL_LOCK)."""
    _SUSPENDED["depth"] -= 1
    if _SUSPENDED["depth"] == 0:
        hooks, pre, cached = _SUSPENDED["saved"]
        hooks.update(_m._global_backward_hooks)  # (any registered meanwhile)
        pre.update(_m._global_backward_pre_hooks)
        _m._global_backward_hooks, _m._global_backward_pre_hooks = hooks, pre
        parametrize._cache_enabled += cached
        _SUSPENDED["saved"] = None


@contextlib.contextmanager
def model_state(model: nn.Module, bn: str) -> Iterator[None]:
    """Set the modes a computation needs; restore every flag and forward afterwards.

    * the modules' backward hooks are suspended (restored afterwards), and the
      process-wide ones (``register_module_full_backward_hook``) for the call, as is
      ``parametrize.cached()``'s cache; tensors kept as plain module attributes are
      restored;
    * every module goes to eval mode (dropout off: the kernel is deterministic), by its
      ``training`` flag (a ``train()`` override of the user's is not run: its side
      effects, e.g. freezing a backbone, would outlive the call);
    * ``bn="batch"``: BatchNorm modules in train mode (batch statistics);
    * ``bn="per_sample"``: BatchNorm modules normalise each sample by itself.

    Calls on one model, or on models sharing a module, are serialised (a lock per module).
    """
    with contextlib.ExitStack() as held:
        held.enter_context(locked(model))
        held.enter_context(_suspended_process_state())
        flags = [(m, m.training) for m in model.modules()]
        # tensors kept as plain attributes (the legacy weight_norm / spectral_norm and
        # prune pre-hooks write the derived weight there, from fastntk's copies)
        attrs = [(m, {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)})
                 for m in model.modules()]  # fmt: skip
        swapped: list[tuple[nn.Module, Any]] = []
        # The user's module backward hooks are suspended: the kernel is of the function, a
        # hook may change gradients, and torch.func refuses modules with full backward hooks.
        hooks = [(m, m._backward_hooks, m._backward_pre_hooks, m._is_full_backward_hook)
                 for m in model.modules()]  # fmt: skip
        # the (module, attribute) slots: torch.func's functional_call swaps fastntk's copies
        # in and out; a Ctrl-C inside its swap-out left copies in the user's model
        slots = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
        layout_fixes = []
        sparse: list[nn.Module] = []
        try:
            for m, *_ in hooks:
                clear_backward_hooks(m)
            for m in batchnorms(model):
                layout_fixes.append(m.register_forward_hook(_bn_gradient_layout))
            for m in model.modules():
                m.training = False
            for m in batchnorms(model):
                if bn == "batch":
                    m.training = True
                elif bn == "per_sample":
                    if "forward" in m.__dict__:  # the user's: what it computes is unknown
                        raise UnsupportedError(
                            f"bn='per_sample' cannot normalise {type(m).__name__} "
                            f"{_name_of(model, m)!r}: its forward is set on the instance (an "
                            "identity, a wrapper); use bn='eval' or 'batch', under which that "
                            "forward runs as set"
                        )
                    if type(m).forward not in _BN_FORWARDS:  # a subclass's own computation
                        raise UnsupportedError(
                            f"bn='per_sample' cannot normalise {type(m).__name__} "
                            f"{_name_of(model, m)!r}: its class overrides BatchNorm's forward, "
                            "which per-sample statistics would have to replace; use bn='eval' "
                            "or 'batch', under which that forward runs as written"
                        )
                    swapped.append((m, _MISSING))
                    m.forward = types.MethodType(_per_sample_bn_forward, m)
            for m in model.modules():  # sparse tables: dense gradients (same values)
                if isinstance(m, nn.Embedding) and m.sparse:
                    sparse.append(m)
                    m.sparse = False
            for m in model.modules():
                if type(m) is nn.PReLU and "forward" not in m.__dict__:  # (not a subclass)
                    swapped.append((m, m.__dict__.get("forward", _MISSING)))
                    m.forward = types.MethodType(_prelu_forward, m)
            yield
        finally:
            with _sigint_deferred():  # (a Ctrl-C now is delivered once all is restored)
                _restore_model(layout_fixes, sparse, hooks, swapped, flags, attrs, slots)


def _restore_model(layout_fixes, sparse, hooks, swapped, flags, attrs, slots) -> None:
    """What model_state changed, put back (each step idempotent)."""
    for h in layout_fixes:
        h.remove()
    for m in sparse:
        m.sparse = True
    for m, bh, bph, full in hooks:
        m._backward_hooks, m._backward_pre_hooks, m._is_full_backward_hook = bh, bph, full
    for m, old in swapped:
        if old is _MISSING:
            m.__dict__.pop("forward", None)
        else:
            m.forward = old
    for m, t in flags:
        m.training = t
    for m, kept in attrs:
        for k in [k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]:
            if k not in kept:
                del m.__dict__[k]
        m.__dict__.update(kept)
    for m, params, buffers in slots:
        for store, saved in ((m._parameters, params), (m._buffers, buffers)):
            for k, v in saved.items():
                if store.get(k) is not v:
                    store[k] = v


_MISSING = object()


def _bn_gradient_layout(module: nn.Module, args: Any, out: Any) -> None:
    """PyTorch's CPU BatchNorm backward (2.11 and 2.13) returns a wrong input gradient for
    a batch of one sample when the output gradient arrives in another memory layout than
    the output (channels-last strides, from a ``flatten(2).transpose(1, 2)`` downstream):
    a per-sample backward or a one-sample chunk gave wrong kernels (the conv model of
    ``tests/test_engine_edge_cases.py::test_one_sample_batchnorm_backward_with_channels_last_gradients``).
    The gradient is handed on in the output's own layout."""
    if not (isinstance(out, torch.Tensor) and out.grad_fn is not None and out.shape[0] == 1):
        return
    if torch._C._functorch.is_functorch_wrapped_tensor(out):
        return  # torch.func (vmap, grad) never runs the native backward this way
    fmt = (torch.channels_last if out.dim() == 4 and not out.is_contiguous()
           and out.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)  # fmt: skip

    def prehook(grad_outputs):
        g = grad_outputs[0]
        if g is None or g.is_contiguous(memory_format=fmt):
            return None
        return (g.contiguous(memory_format=fmt), *grad_outputs[1:])

    out.grad_fn.register_prehook(prehook)


def owners(model: nn.Module) -> dict[str, list[tuple[str, nn.Module, str]]]:
    """canonical param name -> [(module name, module, attribute)] for every registration."""
    named = dict(model.named_parameters())
    canon = {id(p): n for n, p in named.items()}
    out: dict[str, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is not None and id(p) in canon:
                entry = (mname, m, attr)
                lst = out.setdefault(canon[id(p)], [])
                if all(e[1] is not m or e[2] != attr for e in lst):
                    lst.append(entry)
    return out
