"""The options of one ``ntk`` / ``ntk_sketch`` / ``explain`` call, checked and parsed once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from fastntk import _args, _model
from fastntk.errors import OptionError

METHODS = ("auto", "layerwise", "triton", "csrc", "sketch", "vmap", "loop")
# the methods that run the layerwise engine (they differ in the kernels its rules use)
LAYERWISE_METHODS = ("auto", "layerwise", "triton", "csrc")

# Default sample chunk of one forward/backward; chosen for the 24 GB development CPU
# (NB201 C=16 at N=256 needs about 2 GB for forward+backward).
DEFAULT_SAMPLE_CHUNK = 256


@dataclass(frozen=True)
class Options:
    """A call's options, checked: what the plan is made from."""

    output: str | int | Callable[[Any], torch.Tensor]
    bn: str
    method: str
    params: Any  # the selection as given (the sketch of ``method="sketch"`` takes it again)
    selected: dict[str, nn.Parameter]  # canonical name -> the user's parameter
    dtype: torch.dtype
    samples: int  # samples per forward/backward chunk
    cols: int | None  # columns bound of one per-sample gradient block (None: the default)
    chunk_size: Any  # as given (passed on to the sketch)
    progress: bool | None
    sketch_dim: int
    seed: int


def parse(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    *,
    output: Any,
    bn: str,
    params: Any,
    method: str,
    chunk_size: Any,
    dtype: Any,
    progress: Any,
    sketch_dim: Any = 4096,
    seed: Any = 0,
    scalar: bool = False,
) -> Options:
    """Check every option (and the inputs and model: :func:`fastntk._model.check_inputs`)
    and resolve the parameter selection, the dtype and the chunk sizes. ``scalar``: refuse
    ``output="full"`` (the sketch's scalar kernels).

    Raises:
        fastntk.errors.FastNTKError subclasses, in this order of checks: OptionError
        (``bn``/``method``/``output``, ``progress``), InputError / InputTypeError,
        ParameterSelectionError, OptionError (``dtype``, ``chunk_size``, ``sketch_dim``,
        ``seed``).
    """
    _model.check_options(output, bn, method, METHODS)
    _model.check_progress(progress)
    _model.check_inputs(model, x1, x2)
    if scalar and output == "full":
        raise OptionError(
            "the sketch estimates scalar kernels; use output='sum', 'trace' or 'mean'"
        )
    if scalar:  # (the sketch's own options first)
        sketch_dim, seed = _sketch_args(sketch_dim, seed)
    selected = _model.select_params(model, params)
    dtype = _model.resolve_dtype(dtype, model, selected)
    samples, cols = parse_chunk_size(chunk_size)
    if not scalar:  # (checked for every method)
        sketch_dim, seed = _sketch_args(sketch_dim, seed)
    return Options(output, bn, method, params, selected, dtype, samples, cols, chunk_size,
                   progress, sketch_dim, seed)  # fmt: skip


def _sketch_args(sketch_dim: Any, seed: Any) -> tuple[int, int]:
    return _args.integer(sketch_dim, "sketch_dim", 1), _args.integer(seed, "seed")


def parse_chunk_size(chunk_size: Any) -> tuple[int, int | None]:
    """(samples, columns or None) of a ``chunk_size`` option: an int, or a pair of an int
    and an int or None (the default column bound)."""
    if chunk_size is None:
        return DEFAULT_SAMPLE_CHUNK, None
    if isinstance(chunk_size, tuple) and len(chunk_size) == 2:
        s, c = chunk_size
    elif _args.is_int(chunk_size):
        s, c = chunk_size, None
    else:
        raise OptionError(f"chunk_size must be an int or (samples, columns), got {chunk_size!r}")
    s = _args.integer(s, "chunk_size's samples", 1)
    return s, None if c is None else _args.integer(c, "chunk_size's columns", 1)
