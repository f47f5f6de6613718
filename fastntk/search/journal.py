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

The space part of the key is :func:`space_key`: the space's ``name``, followed by
the constructor options that differ from their defaults (``"nb201"`` for the
benchmark's NB201 network, ``"nb201(C=8,N=1)"`` for a narrower one), so networks of
different sizes never share scores.

Concurrency and crashes: the database runs in WAL mode with
``synchronous=FULL``, each write is ``BEGIN IMMEDIATE ... COMMIT``; SQLite's
atomic commit means a process killed mid-write (even by SIGKILL) leaves either
the whole row or nothing, and two processes can write to one database (the
second waits for the lock, retrying in Python so that Ctrl-C still interrupts
it; if both evaluated the same architecture, the second insert is ignored).

A database that has tables but no fastntk ``evaluations`` table (another
application's file) is refused before anything in it is changed, and a damaged
row (metrics that are not a JSON object of numbers) raises :class:`JournalError`
naming the file and the row.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastntk._args import integer, is_int
from fastntk.errors import FastNTKError, JournalError

__all__ = ["Journal", "JournalError", "settings_key", "space_key"]

_COLUMNS = {
    "id",
    "space",
    "arch",
    "settings",
    "metrics",
    "seed",
    "data",
    "elapsed",
    "created",
    "version",
}
# SQLite's own wait for a lock (its busy handler sleeps in C, deaf to Ctrl-C): kept short;
# longer waits are retried in Python (Journal._retry) until the journal's timeout.
_SQLITE_WAIT = 0.1
# Test hook: when set, Journal.record calls it with the journal inside each write's
# transaction, after the INSERT and before the COMMIT (and a merge's UPDATE), so that a
# test can kill the process in the middle of a write (tests/test_journal.py). None in use.
_write_hook: Callable[[Journal], None] | None = None

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


class _Foreign(Exception):
    """(internal) the database is another application's: not retried."""


def settings_key(settings: Mapping[str, Any] | str | None) -> str:
    """Canonical JSON of ``settings`` (sorted keys, no spaces): the key's third part."""
    if settings is None:
        return "{}"
    if isinstance(settings, str):
        return settings
    return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str)


def space_key(space: Any) -> str:
    """The journal's name for ``space``: ``space.name``, plus its configuration.

    The configuration is read from the constructor's keyword options that the instance
    keeps as same-named attributes (``NB201Space(C, N)``, ``DartsSpace(C, layers)``, a
    registered or user space written the same way); options at their default value are
    left out, so the default configuration's key is the bare name (``"nb201"``) whichever
    options a space takes. Others get a canonical suffix: ``"nb201(C=8,N=1)"``. A space may define ``journal_key`` (a string,
    or a method returning one) to name its configuration itself.
    """
    own = getattr(space, "journal_key", None)
    if own is not None:
        return str(own() if callable(own) else own)
    name = str(getattr(space, "name", type(space).__name__))
    try:
        params = list(inspect.signature(type(space).__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return name
    parts = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or not hasattr(space, p.name):
            continue
        v = getattr(space, p.name)
        if p.default is not p.empty and _same(v, p.default):
            continue
        parts.append(f"{p.name}={int(v.__index__()) if is_int(v) else v!r}")
    return f"{name}({','.join(sorted(parts))})" if parts else name


def _same(a: Any, b: Any) -> bool:
    try:
        return (type(a) is type(b) or (is_int(a) and is_int(b))) and bool(a == b)
    except Exception:  # an option whose == is not a bool (an array): not the default
        return False


def _transient(e: sqlite3.Error) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


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
        timeout: seconds to wait for another process's write lock (retried in short
            steps, so Ctrl-C interrupts the wait).

    Raises:
        JournalError: the file cannot be created, opened or written, or it is another
            application's database (tables, but no fastntk journal table).
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0):
        if not isinstance(path, (str, os.PathLike)):
            raise JournalError(f"a journal path must be a str or os.PathLike, got {path!r}")
        self.path = os.fspath(path)
        if not isinstance(self.path, str) or not self.path.strip():
            raise JournalError(f"a journal needs a database file name, got {self.path!r}")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not (timeout >= 0 and math.isfinite(timeout))
        ):
            raise JournalError(f"the journal timeout must be finite seconds >= 0, got "
                               f"{timeout!r}")  # fmt: skip
        self.timeout = float(timeout)
        self.version = _version()
        self._con: sqlite3.Connection | None = None
        # SQLite answers "database is locked" at once, without waiting on the busy
        # handler, when two processes switch a new database to WAL mode or create its
        # schema at the same moment (tests/test_journal.py's concurrent-writers test
        # reaches it): the set-up is retried until ``timeout``.
        self._retry("use", "as a journal database", self._open)

    def _open(self) -> None:
        if self._con is not None:
            with contextlib.suppress(Exception):
                self._con.close()
        self._con = con = sqlite3.connect(
            self.path, timeout=min(_SQLITE_WAIT, self.timeout), isolation_level=None
        )
        con.execute(f"PRAGMA busy_timeout = {int(min(_SQLITE_WAIT, self.timeout) * 1000)}")
        self._check_ours()
        if self.path != ":memory:":
            con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = FULL")
        with self._transaction():
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    con.execute(stmt)

    def _check_ours(self) -> None:
        """Refuse another application's database before changing anything in it."""
        tables = {
            r[0]
            for r in self._con.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        if not tables:
            return  # a new (empty) database: ours to set up
        if "evaluations" in tables:
            cols = {r[1] for r in self._con.execute("PRAGMA table_info(evaluations)")}
            if _COLUMNS <= cols:
                return
        raise _Foreign(
            f"{self.path!r} is not a fastntk journal: it is another database "
            f"(tables {', '.join(sorted(tables))}); give a new file or a journal"
        )

    def _retry(self, verb: str, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried while another connection holds a lock, until ``timeout``.

        The waits are Python sleeps of at most 0.25 s (SQLite's own busy wait is
        ``_SQLITE_WAIT``), so a KeyboardInterrupt gets through within a fraction of a
        second.
        """
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                return fn()
            except _Foreign as e:
                raise JournalError(str(e)) from None
            except sqlite3.Error as e:
                if not _transient(e) or time.monotonic() > deadline:
                    raise JournalError(f"cannot {verb} {self.path!r} {what}: {e}") from None
            time.sleep(delay)
            delay = min(0.25, delay * 2)

    # -- low level -------------------------------------------------------

    def _transaction(self):
        con = self._con

        class _Tx:
            def __enter__(self_inner):
                con.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, exc, tb):
                if exc_type is None:
                    try:
                        con.execute("COMMIT")
                        return False
                    except BaseException:
                        if con.in_transaction:
                            con.execute("ROLLBACK")
                        raise
                if con.in_transaction:  # (an interrupt may land between the statements)
                    con.execute("ROLLBACK")
                return False

        return _Tx()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _metrics(self, row_id: int, text: Any) -> dict[str, float]:
        """The metrics JSON of row ``row_id``; JournalError if it is damaged."""
        try:
            m = json.loads(text)
        except (TypeError, ValueError):
            m = None
        if not isinstance(m, dict) or not all(
            isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float))
            for k, v in m.items()
        ):
            raise JournalError(f"journal {self.path!r}: row {row_id} is damaged (its metrics "
                               f"are not a JSON object of numbers: {str(text)[:80]!r}); delete "
                               f"the row (DELETE FROM evaluations WHERE id={row_id}) to "
                               f"recompute it")  # fmt: skip
        return {k: float(v) for k, v in m.items()}

    # -- cache -----------------------------------------------------------

    def get(
        self, space: str, arch: str, settings: Mapping[str, Any] | str | None = None
    ) -> dict[str, float] | None:
        """Metric values stored for ``(space, arch, settings)``, or None.

        Raises:
            JournalError: the row is damaged (its metrics are not a JSON object of numbers).
        """
        row = self._retry(
            "read",
            "journal",
            lambda: self._con.execute(
                "SELECT id, metrics FROM evaluations WHERE space=? AND arch=? AND settings=?",
                (space, arch, settings_key(settings)),
            ).fetchone(),
        )
        return None if row is None else self._metrics(row[0], row[1])

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
        merge: bool = False,
    ) -> bool:
        """Store one evaluation in its own transaction; False if the key was already stored.

        With ``merge=True`` a stored row of the key gains the metrics it lacks (its own
        values are kept); True if it changed.

        Raises:
            JournalError: the database cannot be written, or ``seed`` is not an int that
                SQLite stores (in [-2**63, 2**63)).
        """
        if seed is not None:
            try:
                seed = integer(seed, "the seed stored in the journal", -(2**63), 2**63)
            except FastNTKError as e:
                raise JournalError(str(e)) from None
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        key = settings_key(settings)

        def write() -> bool:
            with self._transaction():
                cur = self._con.execute(
                    "INSERT OR IGNORE INTO evaluations (space, arch, settings, metrics, seed, "
                    "data, elapsed, created, version) VALUES (?,?,?,?,?,?,?,?,?)",
                    (space, arch, key, _dumps(metrics), seed, data, elapsed, created, self.version),
                )
                if _write_hook is not None:
                    _write_hook(self)
                if cur.rowcount == 1 or not merge:
                    return cur.rowcount == 1
                row_id, text = self._con.execute(
                    "SELECT id, metrics FROM evaluations WHERE space=? AND arch=? AND settings=?",
                    (space, arch, key),
                ).fetchone()
                old = self._metrics(row_id, text)
                new = {**{k: float(v) for k, v in metrics.items()}, **old}
                if new == old:
                    return False
                self._con.execute(
                    "UPDATE evaluations SET metrics=? WHERE id=?", (_dumps(new), row_id)
                )
                return True

        return self._retry("write", "journal", write)

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
        sql = (
            "SELECT id, space, arch, settings, metrics, seed, data, elapsed, created, version "
            "FROM evaluations"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        fetched = self._retry(
            "read", "journal", lambda: self._con.execute(sql + " ORDER BY id", args).fetchall()
        )
        out = []
        for r in fetched:
            try:
                st = json.loads(r[3])
            except (TypeError, ValueError):
                raise JournalError(
                    f"journal {self.path!r}: row {r[0]} is damaged (its "
                    f"settings are not JSON: {str(r[3])[:80]!r})"
                ) from None
            out.append(
                {
                    "id": r[0],
                    "space": r[1],
                    "arch": r[2],
                    "settings": st,
                    "metrics": self._metrics(r[0], r[4]),
                    "seed": r[5],
                    "data": r[6],
                    "elapsed": r[7],
                    "created": r[8],
                    "version": r[9],
                }
            )
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
        return self._retry(
            "read",
            "journal",
            lambda: self._con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0],
        )
