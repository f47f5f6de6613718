"""SQLite journal of architecture evaluations: crash-safe cache and result store.

Every evaluation is one row, written in its own transaction as soon as it
completes: the search space, the architecture's canonical encoding, the metric
values (JSON), the *settings* that determine those values (metric names, batch
size, data, BN mode, seed, ...: canonical JSON, part of the key), the seed and
data description, the wall time the evaluation took, a UTC timestamp and the
fastntk version.

Key: ``(space, arch, settings)`` is UNIQUE, so an architecture is never stored
twice for the same settings; search algorithms look results up before
computing them (:meth:`Journal.get`), so re-running a search on the same
database resumes it: completed evaluations are served from the journal and the
trajectory for a seed is the same.

Concurrency and crashes: the database runs in WAL mode with
``synchronous=FULL`` and a busy timeout, each write is ``BEGIN IMMEDIATE ...
COMMIT``; SQLite's atomic commit means a process killed mid-write (even by
SIGKILL) leaves either the whole row or nothing, and two processes can write
to one database (the second waits for the lock; if both evaluated the same
architecture, the second insert is ignored).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from fastntk.errors import FastNTKError

__all__ = ["Journal", "JournalError", "settings_key"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    space TEXT NOT NULL,
    arch TEXT NOT NULL,
    settings TEXT NOT NULL,
    metrics TEXT NOT NULL,
    seed INTEGER,
    data TEXT,
    elapsed REAL,
    created TEXT NOT NULL,
    version TEXT,
    UNIQUE (space, arch, settings)
);
CREATE INDEX IF NOT EXISTS evaluations_space_settings ON evaluations (space, settings);
"""


class JournalError(FastNTKError, OSError):
    """The journal database cannot be opened or written."""


def settings_key(settings: Mapping[str, Any] | str | None) -> str:
    """Canonical JSON of ``settings`` (sorted keys, no spaces): the key's third part."""
    if settings is None:
        return "{}"
    if isinstance(settings, str):
        return settings
    return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str)


def _version() -> str:
    try:
        import fastntk

        v = getattr(fastntk, "__version__", None)
        if v:
            return str(v)
    except Exception:  # pragma: no cover - a broken package import must not stop journaling
        pass
    try:
        from importlib.metadata import version

        return version("fastntk")
    except Exception:
        return "unknown"


def _dumps(metrics: Mapping[str, float]) -> str:
    # NaN/inf are legal metric values (a degenerate kernel); JSON with allow_nan keeps them.
    return json.dumps({k: float(v) for k, v in metrics.items()}, sort_keys=True)


class Journal:
    """An evaluation journal in the SQLite file ``path`` (created if missing).

    Args:
        path: database file; ``":memory:"`` for a throw-away journal.
        timeout: seconds to wait for another process's write lock.

    Raises:
        JournalError: the file cannot be created, opened or written.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0):
        self.path = os.fspath(path)
        self.version = _version()
        # SQLite answers "database is locked" at once, without waiting on the busy
        # handler, when two processes switch a new database to WAL mode or create its
        # schema at the same moment (seen in tests/test_journal.py's concurrent-writers
        # test, about 1 run in 10): the set-up is retried until ``timeout``.
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                self._con = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
                self._con.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
                if self.path != ":memory:":
                    self._con.execute("PRAGMA journal_mode = WAL")
                self._con.execute("PRAGMA synchronous = FULL")
                with self._transaction():
                    for stmt in _SCHEMA.strip().split(";"):
                        if stmt.strip():
                            self._con.execute(stmt)
                break
            except sqlite3.OperationalError as e:
                transient = "locked" in str(e) or "busy" in str(e)
                if not transient or time.monotonic() > deadline:
                    raise JournalError(
                        f"cannot use {self.path!r} as a journal database: {e}"
                    ) from None
                with contextlib.suppress(Exception):
                    self._con.close()
                time.sleep(delay)
                delay = min(0.5, delay * 2)
            except sqlite3.Error as e:
                raise JournalError(f"cannot use {self.path!r} as a journal database: {e}") from None

    # -- low level -------------------------------------------------------

    def _transaction(self):
        con = self._con

        class _Tx:
            def __enter__(self_inner):
                con.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, exc, tb):
                con.execute("COMMIT" if exc_type is None else "ROLLBACK")
                return False

        return _Tx()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- cache -----------------------------------------------------------

    def get(self, space: str, arch: str, settings: Mapping[str, Any] | str | None = None
            ) -> dict[str, float] | None:
        """Metric values stored for ``(space, arch, settings)``, or None."""
        try:
            row = self._con.execute(
                "SELECT metrics FROM evaluations WHERE space=? AND arch=? AND settings=?",
                (space, arch, settings_key(settings)),
            ).fetchone()
        except sqlite3.Error as e:
            raise JournalError(f"cannot read journal {self.path!r}: {e}") from None
        return None if row is None else json.loads(row[0])

    def record(
        self,
        space: str,
        arch: str,
        settings: Mapping[str, Any] | str | None,
        metrics: Mapping[str, float],
        *,
        seed: int | None = None,
        data: str | None = None,
        elapsed: float | None = None,
    ) -> bool:
        """Store one evaluation in its own transaction; False if the key was already stored."""
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            with self._transaction():
                cur = self._con.execute(
                    "INSERT OR IGNORE INTO evaluations (space, arch, settings, metrics, seed, "
                    "data, elapsed, created, version) VALUES (?,?,?,?,?,?,?,?,?)",
                    (space, arch, settings_key(settings), _dumps(metrics), seed, data,
                     elapsed, created, self.version),
                )
                return cur.rowcount == 1
        except sqlite3.Error as e:
            raise JournalError(f"cannot write journal {self.path!r}: {e}") from None

    # -- queries ---------------------------------------------------------

    def rows(
        self,
        space: str | None = None,
        settings: Mapping[str, Any] | str | None = None,
        arch: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored evaluations (oldest first), filtered by the arguments that are not None.

        Each row is a dict: ``id, space, arch, settings`` (dict), ``metrics`` (dict),
        ``seed, data, elapsed, created, version``.
        """
        where, args = [], []
        if space is not None:
            where.append("space=?")
            args.append(space)
        if settings is not None:
            where.append("settings=?")
            args.append(settings_key(settings))
        if arch is not None:
            where.append("arch=?")
            args.append(arch)
        sql = ("SELECT id, space, arch, settings, metrics, seed, data, elapsed, created, version "
               "FROM evaluations")
        if where:
            sql += " WHERE " + " AND ".join(where)
        try:
            cur = self._con.execute(sql + " ORDER BY id", args)
            out = []
            for r in cur.fetchall():
                out.append({
                    "id": r[0], "space": r[1], "arch": r[2], "settings": json.loads(r[3]),
                    "metrics": json.loads(r[4]), "seed": r[5], "data": r[6],
                    "elapsed": r[7], "created": r[8], "version": r[9],
                })
        except sqlite3.Error as e:
            raise JournalError(f"cannot read journal {self.path!r}: {e}") from None
        return out

    def best(
        self,
        metric: str,
        *,
        higher_is_better: bool = True,
        space: str | None = None,
        settings: Mapping[str, Any] | str | None = None,
        k: int = 1,
    ) -> list[dict[str, Any]]:
        """The ``k`` rows with the best value of ``metric`` (NaN rows last), best first."""
        rows = [r for r in self.rows(space, settings) if metric in r["metrics"]]

        def key(r):
            v = r["metrics"][metric]
            if v is None or math.isnan(v):
                return (1, 0.0)
            return (0, -v if higher_is_better else v)

        return sorted(rows, key=key)[:k]

    def __len__(self) -> int:
        return self._con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
