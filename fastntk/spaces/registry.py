"""Look up a search space by name: ``get_space("nb201")``.

Spaces are imported lazily, so ``get_space("darts")`` does not load
NAS-Bench-201's table. :func:`register_space` adds a user space (any object
implementing :class:`fastntk.spaces.base.SearchSpace`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from fastntk.errors import OptionError

__all__ = ["get_space", "register_space", "space_names"]

# name -> "module:Class" (lazy) or a factory
_SPACES: dict[str, str | Callable[[], Any]] = {
    "nb201": "fastntk.spaces.nb201:NB201Space",
    "darts": "fastntk.spaces.darts:DartsSpace",
    "resnet": "fastntk.spaces.resnet:ResNetSpace",
    "vit": "fastntk.spaces.vit:ViTSpace",
}


def space_names() -> list[str]:
    """Names :func:`get_space` knows, sorted."""
    return sorted(_SPACES)


def register_space(name: str, factory: Callable[[], Any]) -> None:
    """Make ``get_space(name)`` return ``factory()``."""
    _SPACES[name] = factory


def get_space(name: str, **kwargs: Any) -> Any:
    """A new instance of the search space ``name`` (keyword arguments go to its constructor).

    Raises:
        OptionError: ``name`` is not a known space; the message lists the known ones.
    """
    entry = _SPACES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise OptionError(
            f"unknown search space {name!r}; known spaces: {', '.join(space_names())}"
        )
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = getattr(importlib.import_module(module), cls)
    try:
        sig = inspect.signature(entry)
        sig.bind(**kwargs)
    except TypeError as e:
        raise OptionError(f"space {name!r} takes {sig}: {e}") from None
    except ValueError:  # no signature to read: let the constructor check
        pass
    return entry(**kwargs)
