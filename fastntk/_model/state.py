"""A call's hold on the user's model: the locks, the modes it sets and everything it puts
back. Module train/eval flags and the per-sample BatchNorm forward are changed for the
duration of a call and restored in a ``finally`` block by :func:`model_state` (Ctrl-C
held back while it restores; every parameter and buffer slot put back as it was).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from fastntk._model.forwards import (
    BN_FORWARDS,
    bn_gradient_layout,
    per_sample_bn_forward,
    prelu_forward,
)
from fastntk._model.structure import batchnorms
from fastntk.errors import UnsupportedError


def _plain(cls: type) -> bool:
    """Whether instances of ``cls`` keep ``training`` and the hook dicts as plain instance
    attributes: nn.Module's own ``__setattr__`` and no class attribute of those names (a
    ``training`` property, as torch.compile's OptimizedModule has, must see its writes).
    Decided once per class (a call writes these four attributes of every module twice)."""
    plain = _PLAIN.get(cls)
    if plain is None:
        names = ("training", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook")
        plain = cls.__setattr__ is nn.Module.__setattr__ and not any(hasattr(cls, n) for n in names)
        _PLAIN[cls] = plain
    return plain


_PLAIN: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _set(module: nn.Module, name: str, value: Any) -> None:
    """``setattr(module, name, value)`` for a flag or hook dict. Where it is a plain
    attribute, written into ``__dict__``, past nn.Module.__setattr__'s parameter, buffer and
    submodule checks, which each call of the engine otherwise runs for every module four
    times over (set and restore)."""
    if _plain(type(module)):
        module.__dict__[name] = value
    else:
        setattr(module, name, value)


def _set_backward_hooks(module: nn.Module, hooks: Any, pre_hooks: Any, full: Any) -> None:
    _set(module, "_backward_hooks", hooks)
    _set(module, "_backward_pre_hooks", pre_hooks)
    _set(module, "_is_full_backward_hook", full)


def clear_backward_hooks(module: nn.Module) -> None:
    """Drop ``module``'s own backward hooks (the caller keeps the dicts to restore them)."""
    _set_backward_hooks(module, OrderedDict(), OrderedDict(), None)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "?") or "the model"


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
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is None
    ):
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
                _m._global_backward_hooks, _m._global_backward_pre_hooks = (
                    OrderedDict(),
                    OrderedDict(),
                )
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
        mods = list(model.modules())  # (walked once: a transformer has hundreds)
        bns = batchnorms(model)
        flags = [(m, m.training) for m in mods]
        # tensors kept as plain attributes (the legacy weight_norm / spectral_norm and
        # prune pre-hooks write the derived weight there, from fastntk's copies)
        attrs = [(m, {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)})
                 for m in mods]  # fmt: skip
        swapped: list[tuple[nn.Module, Any]] = []
        # The user's module backward hooks are suspended: the kernel is of the function, a
        # hook may change gradients, and torch.func refuses modules with full backward hooks.
        hooks = [(m, m._backward_hooks, m._backward_pre_hooks, m._is_full_backward_hook)
                 for m in mods]  # fmt: skip
        # the (module, attribute) slots: torch.func's functional_call swaps fastntk's copies
        # in and out; a Ctrl-C inside its swap-out left copies in the user's model
        slots = [(m, dict(m._parameters), dict(m._buffers)) for m in mods]
        layout_fixes = []
        sparse: list[nn.Module] = []
        try:
            for m, *_ in hooks:
                clear_backward_hooks(m)
            for m in bns:
                layout_fixes.append(m.register_forward_hook(bn_gradient_layout))
            for m in mods:
                _set(m, "training", False)
            for m in bns:
                if bn == "batch":
                    _set(m, "training", True)
                elif bn == "per_sample":
                    if "forward" in m.__dict__:  # the user's: what it computes is unknown
                        raise UnsupportedError(
                            f"bn='per_sample' cannot normalise {type(m).__name__} "
                            f"{_name_of(model, m)!r}: its forward is set on the instance (an "
                            "identity, a wrapper); use bn='eval' or 'batch', under which that "
                            "forward runs as set"
                        )
                    if type(m).forward not in BN_FORWARDS:  # a subclass's own computation
                        raise UnsupportedError(
                            f"bn='per_sample' cannot normalise {type(m).__name__} "
                            f"{_name_of(model, m)!r}: its class overrides BatchNorm's forward, "
                            "which per-sample statistics would have to replace; use bn='eval' "
                            "or 'batch', under which that forward runs as written"
                        )
                    swapped.append((m, _MISSING))
                    m.forward = types.MethodType(per_sample_bn_forward, m)
            for m in mods:  # sparse tables: dense gradients (same values)
                if isinstance(m, nn.Embedding) and m.sparse:
                    sparse.append(m)
                    m.sparse = False
            for m in mods:
                if type(m) is nn.PReLU and "forward" not in m.__dict__:  # (not a subclass)
                    swapped.append((m, m.__dict__.get("forward", _MISSING)))
                    m.forward = types.MethodType(prelu_forward, m)
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
    for m, *saved in hooks:
        _set_backward_hooks(m, *saved)
    for m, old in swapped:
        if old is _MISSING:
            m.__dict__.pop("forward", None)
        else:
            m.forward = old
    for m, t in flags:
        _set(m, "training", t)
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
