"""The benchmark scripts of ``bench/`` as modules, for the tests of their logic."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` imported from its path (its siblings, ``_meta`` and ``_child``,
    importable as it imports them)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
