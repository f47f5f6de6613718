"""Checks of ``ntk``'s arguments, made before any forward: the options, the inputs, the
model, the parameter selection and the computation dtype; typed errors with advice."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fastntk.errors import (
    InputError,
    InputTypeError,
    OptionError,
    ParameterSelectionError,
    UnsupportedError,
)

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
        if not (x.is_floating_point() or is_index(x)):
            raise InputTypeError(f"{nm} has dtype {x.dtype}; pass floating-point inputs")
        if is_index(x) and not any(isinstance(m, _EMBEDDINGS) for m in model.modules()):
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


def is_index(x: torch.Tensor) -> bool:
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
