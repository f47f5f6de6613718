"""The SQLite journal: cache, queries, SIGKILL + resume, concurrent writers."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _toy_space import DIRECTIONS, ToySpace, toy_metrics  # noqa: E402

from fastntk.errors import OptionError  # noqa: E402
from fastntk.search import (  # noqa: E402
    Journal,
    JournalError,
    Scorer,
    random_search,
    regularized_evolution,
)

ROOT = Path(__file__).resolve().parent.parent

# The worker loads fastntk's search layer without running fastntk/__init__.py (which
# imports torch: ~3-7 s per process on the 2-core CI machine); the search layer and the
# journal do not use torch.
WORKER = r"""
import json, os, signal, sys, time, types
pkg = types.ModuleType("fastntk")
pkg.__path__ = [{pkg!r}]
sys.modules["fastntk"] = pkg
sys.path.insert(0, {tests!r})
from _toy_space import DIRECTIONS, ToySpace, toy_metrics
from fastntk.search import Journal, Scorer, random_search, regularized_evolution
from fastntk.search import journal as journal_module

db, calls, algo, seed, budget, sleep, D = sys.argv[1:8]
kill_at = int(sys.argv[8]) if len(sys.argv) > 8 else 0  # SIGKILL inside this write (1 = first)
writes = []

def kill_mid_write(j):  # journal_module._write_hook: after the INSERT, before the COMMIT
    writes.append(1)
    if len(writes) == kill_at:
        arch = j._con.execute(
            "SELECT arch FROM evaluations WHERE id = last_insert_rowid()").fetchone()[0]
        with open(calls + ".killed", "w") as f:  # the row it was writing, still uncommitted
            json.dump({{"arch": arch, "in_transaction": j._con.in_transaction}}, f)
        os.kill(os.getpid(), signal.SIGKILL)

if kill_at:
    journal_module._write_hook = kill_mid_write
def fn(a):
    with open(calls, "a") as f:
        f.write(a + "\n")
    time.sleep(float(sleep))
    return toy_metrics(a)

scorer = Scorer(fn, ["good"], DIRECTIONS, settings={{"metrics": ["good"], "seed": 0}})
with Journal(db) as j:
    if algo == "rea":
        r = regularized_evolution(ToySpace(D=int(D)), scorer, budget=int(budget),
                                  seed=int(seed), journal=j, population_size=8, sample_size=3)
    else:
        r = random_search(ToySpace(D=int(D)), scorer, budget=int(budget), seed=int(seed),
                          journal=j)
print(json.dumps(r.encodings))
"""


def _worker(tmp_path: Path) -> Path:
    p = tmp_path / "worker.py"
    p.write_text(WORKER.format(tests=str(Path(__file__).parent), pkg=str(ROOT / "fastntk")))
    return p


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _count(db: Path) -> int:
    try:
        con = sqlite3.connect(db, timeout=10)
        try:
            return con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_record_get_rows_best(tmp_path):
    db = tmp_path / "j.db"
    with Journal(db) as j:
        s = {"metrics": ["lga"], "seed": 0}
        assert j.get("nb201", "A", s) is None
        assert j.record("nb201", "A", s, {"lga": 0.5}, seed=0, data="cifar10", elapsed=1.0)
        assert not j.record("nb201", "A", s, {"lga": 0.9})  # same key: ignored, not duplicated
        assert j.record("nb201", "B", s, {"lga": float("nan")})
        assert j.record("nb201", "C", s, {"lga": 0.7})
        assert j.record("nb201", "A", {"metrics": ["lga"], "seed": 1}, {"lga": 0.1})
        assert j.get("nb201", "A", {"seed": 0, "metrics": ["lga"]}) == {"lga": 0.5}  # key order
        assert math.isnan(j.get("nb201", "B", s)["lga"])
        rows = j.rows(space="nb201", settings=s)
        assert [r["arch"] for r in rows] == ["A", "B", "C"]
        assert rows[0]["seed"] == 0 and rows[0]["data"] == "cifar10"
        assert rows[0]["settings"] == s and rows[0]["version"]
        assert [r["arch"] for r in j.best("lga", space="nb201", settings=s, k=3)] == ["C", "A", "B"]
        assert j.best("lga", higher_is_better=False, settings=s)[0]["arch"] == "A"
        assert len(j) == 4
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("path", ["/proc/fastntk/nope.db", "{tmp}/file.txt/sub.db", "{tmp}"])
def test_unwritable_database(tmp_path, path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(JournalError):
        Journal(path.format(tmp=tmp_path))


def test_sigkill_then_resume(tmp_path):
    db, worker = tmp_path / "kill.db", _worker(tmp_path)
    calls1, calls2 = tmp_path / "calls1.txt", tmp_path / "calls2.txt"
    args = ["rea", "5", "40", "0.05", "6"]
    p = subprocess.Popen(
        [sys.executable, str(worker), str(db), str(calls1), *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while _count(db) < 8 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    with Journal(db) as j:
        before = {r["arch"]: r["metrics"] for r in j.rows()}
    assert 8 <= len(before) < 40
    assert set(before) <= set(calls1.read_text().split())

    out = subprocess.run(
        [sys.executable, str(worker), str(db), str(calls2), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    resumed = json.loads(out.stdout)
    computed2 = calls2.read_text().split()
    assert not set(computed2) & set(before)  # nothing journaled is evaluated again
    assert len(computed2) == len(set(computed2))
    with Journal(db) as j:
        rows = j.rows()
        after = {r["arch"]: r["metrics"] for r in rows}
    assert len(rows) == len(after) == len(set(resumed))  # no duplicates, nothing missing
    assert all(after[a] == m for a, m in before.items())  # nothing lost
    # same trajectory as an uninterrupted run with the same seed
    s = Scorer(toy_metrics, ["good"], DIRECTIONS, settings={"metrics": ["good"], "seed": 0})
    ref = regularized_evolution(ToySpace(), s, budget=40, seed=5, population_size=8, sample_size=3)
    assert resumed == ref.encodings
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_two_concurrent_writers(tmp_path):
    db, worker = tmp_path / "two.db", _worker(tmp_path)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(worker),
                str(db),
                str(tmp_path / f"c{i}.txt"),
                "random",
                str(i),
                "60",
                "0.01",
                "3",
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_o, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, e
    trajs = [json.loads(o) for o, _ in outs]
    assert all(len(t) == 60 for t in trajs)
    with Journal(db) as j:
        rows = j.rows()
    archs = [r["arch"] for r in rows]
    assert len(archs) == len(set(archs)) == len(set(trajs[0]) | set(trajs[1]))
    for r in rows:
        assert r["metrics"] == {"good": toy_metrics(r["arch"])["good"]}
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sigkill_inside_a_write(tmp_path):
    """Workers that SIGKILL themselves inside a write (journal._write_hook: after the row's
    INSERT, before its COMMIT, at the 5th, 1st and 17th write of each run): the row being
    written is not in the journal and every row committed before it is; the last run
    resumes to the trajectory of an uninterrupted one; each lost row is computed again by a
    later run."""
    db, worker = tmp_path / "many.db", _worker(tmp_path)
    args = ["rea", "11", "150", "0", "6"]
    stored, lost, runs = 0, [], []
    for i, kill_at in enumerate((5, 1, 17)):
        calls = tmp_path / f"k{i}.txt"
        p = subprocess.run([sys.executable, str(worker), str(db), str(calls), *args,
                            str(kill_at)], env=_env(), capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert p.returncode == -signal.SIGKILL, p.stderr
        killed = json.loads(Path(f"{calls}.killed").read_text())
        computed = calls.read_text().split()
        assert killed["in_transaction"] and len(computed) == kill_at
        assert killed["arch"] == computed[-1]  # the row of the last evaluation
        stored += kill_at - 1
        with Journal(db) as j:
            archs = [r["arch"] for r in j.rows()]
        assert len(archs) == stored and killed["arch"] not in archs
        lost.append(killed["arch"])
        runs.append(computed)
    out = subprocess.run(
        [sys.executable, str(worker), str(db), str(tmp_path / "final.txt"), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    runs.append((tmp_path / "final.txt").read_text().split())
    assert all(a in sum(runs[i + 1 :], []) for i, a in enumerate(lost))
    s = Scorer(toy_metrics, ["good"], DIRECTIONS, settings={"metrics": ["good"], "seed": 0})
    ref = regularized_evolution(
        ToySpace(), s, budget=150, seed=11, population_size=8, sample_size=3
    )
    assert json.loads(out.stdout) == ref.encodings
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    archs = [r[0] for r in con.execute("SELECT arch FROM evaluations")]
    assert len(archs) == len(set(archs)) == len(set(ref.encodings))
    for a, m in con.execute("SELECT arch, metrics FROM evaluations"):
        assert json.loads(m) == {"good": toy_metrics(a)["good"]}


def _toy_run(db, metrics=("good",), settings=None, budget=3):
    s = Scorer(toy_metrics, list(metrics), DIRECTIONS, settings=settings)
    with Journal(db) as j:
        return random_search(ToySpace(), s, budget=budget, seed=0, journal=j)


@pytest.mark.parametrize(
    "bad", ["not json", '{"good": null}', '{"good": "x"}', "null", '"text"', "[1.0]"]
)
def test_damaged_row_raises_journal_error_naming_it(tmp_path, bad):
    db = tmp_path / "j.db"
    _toy_run(db)
    con = sqlite3.connect(db)
    con.execute("UPDATE evaluations SET metrics=? WHERE id=1", (bad,))
    con.commit()
    con.close()
    with pytest.raises(JournalError, match=r"j\.db'.*row 1 is damaged"):
        _toy_run(db)
    with Journal(db) as j, pytest.raises(JournalError, match="row 1 is damaged"):
        j.rows()


def test_row_lacking_a_requested_metric_is_scored_and_completed(tmp_path):
    """Settings that do not list the metrics: a later search asking for one more metric
    computes it (instead of a KeyError) and the row keeps both."""
    db, settings = tmp_path / "j.db", {"seed": 0, "data": "toy"}
    first = _toy_run(db, ["good"], settings, budget=5)
    second = _toy_run(db, ["good", "bad"], settings, budget=5)
    assert second.n_computed == 5 and second.encodings == first.encodings
    with Journal(db) as j:
        rows = j.rows()
    assert len(rows) == 5 and all(set(r["metrics"]) == {"good", "bad"} for r in rows)
    assert all(
        r["metrics"] == {m: toy_metrics(r["arch"])[m] for m in ("good", "bad")} for r in rows
    )
    assert _toy_run(db, ["bad"], settings, budget=5).n_cached == 5


def test_another_applications_database_is_refused_untouched(tmp_path):
    db = tmp_path / "app.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE users (name TEXT)")
    con.execute("INSERT INTO users VALUES ('ann')")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(JournalError, match="not a fastntk journal"):
        Journal(db)
    assert db.read_bytes() == before and not (tmp_path / "app.sqlite-wal").exists()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["users"]


def test_empty_path_refused():
    for bad in ("", "  "):
        with pytest.raises(JournalError, match="file name"):
            Journal(bad)


def test_seed_the_journal_cannot_store(tmp_path):
    calls = []

    def fn(a):
        calls.append(a)
        return toy_metrics(a)

    s = Scorer(fn, ["good"], DIRECTIONS, settings={"metrics": ["good"], "seed": 2**64})
    with Journal(tmp_path / "j.db") as j:
        with pytest.raises(OptionError, match="seed"):
            random_search(ToySpace(), s, budget=3, journal=j)
        assert calls == []  # refused before anything is computed
        with pytest.raises(JournalError, match="seed"):
            j.record("toy", "aaaaaa", None, {"good": 1.0}, seed=2**63)
        np = pytest.importorskip("numpy")
        assert j.record("toy", "aaaaaa", None, {"good": 1.0}, seed=np.int64(3))
        assert j.rows()[0]["seed"] == 3


LOCKED = r"""
import sys, types
pkg = types.ModuleType("fastntk")
pkg.__path__ = [{pkg!r}]
sys.modules["fastntk"] = pkg
from fastntk.search import Journal
print("opening", flush=True)
try:
    Journal(sys.argv[1], timeout=60)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
print("opened", flush=True)
"""


def test_ctrl_c_while_waiting_for_the_write_lock(tmp_path):
    """SQLite's own busy wait sleeps in C, deaf to SIGINT: the journal waits in Python."""
    db, script = tmp_path / "j.db", tmp_path / "locked.py"
    script.write_text(LOCKED.format(pkg=str(ROOT / "fastntk")))
    Journal(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    p = subprocess.Popen(
        [sys.executable, str(script), str(db)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "opening"
        time.sleep(1.0)
        assert p.poll() is None  # still waiting for the lock
        p.send_signal(signal.SIGINT)
        t = time.monotonic()
        out, err = p.communicate(timeout=10)
        assert time.monotonic() - t < 3, "the SIGINT waited for the lock"
        assert p.returncode == 130 and "interrupted" in out, (out, err)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        holder.execute("ROLLBACK")
        holder.close()
