"""One measurement per fresh process (its peak RSS, allocator and caches its own).

The parent runs ``script --child SPEC`` (:func:`run`, or its own ``Popen`` for ranks) and
reads the result the child prints as one ``TAG`` + JSON line (:func:`report`,
:func:`parse`); anything else the child prints is ignored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

TAG = "FASTNTK_BENCH "


def report(result: dict[str, Any]) -> None:
    """The child's result, as the parent reads it."""
    print(TAG + json.dumps(result), flush=True)


def parse(stdout: str) -> dict[str, Any] | None:
    """The last result line of a child's stdout, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(TAG)]
    return json.loads(lines[-1][len(TAG) :]) if lines else None


def run(script: str, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """``script --child json(spec)`` in a fresh Python (warnings off): its result, or
    ``{"error": ...}`` with the exit status and the last line of its stderr, or the
    timeout."""
    cmd = [sys.executable, os.path.abspath(script), "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s"}
    res = parse(p.stdout)
    if res is None:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail}"[:300]}
    return res
