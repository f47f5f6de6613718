"""``fastntk search|evaluate`` over two ranks (gloo, loopback), started as torchrun starts
them (one process per rank, its environment set here) and by ``--workers 2`` (torch's
launcher): the same journal rows and results as one process for random search, evaluate
and pruning; evolution and REINFORCE complete; a worker killed mid-run stops rank 0, and
the rerun resumes from the journal without repeating a journaled evaluation. The full
NB201 network (the ranks are other processes: conftest's tiny_nb201 does not reach them),
on 8 synthetic images."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from cli_run import DATA, run

from fastntk.distributed import spawn_local
from fastntk.search import Journal

COMMON = [*DATA, "--no-progress"]


def _ranks(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    """``python -m fastntk argv`` as ``world`` torchrun-style ranks."""
    return spawn_local([sys.executable, "-m", "fastntk", *argv], world)


def _finish(procs, timeout=300) -> list[tuple[int, str, str]]:
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outs, strict=True)]


def _rows(db) -> list[tuple[str, dict]]:
    with Journal(db) as j:
        return [(r["arch"], r["metrics"]) for r in j.rows()]


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--archs", "6"],
        ["search", "--algo", "random", "--budget", "6"],
        ["search", "--algo", "prune", "--budget", "26"],  # a round, and part of the next
    ],
    ids=["evaluate", "random", "prune"],
)
def test_two_ranks_give_one_process_results(tmp_path, capsys, argv):
    one, two = tmp_path / "one.db", tmp_path / "two.db"
    rc, out1, _ = run(capsys, *argv, *COMMON, "--db", str(one))
    assert rc == 0
    res = _finish(_ranks([*argv, *COMMON, "--db", str(two)]))
    assert [r[0] for r in res] == [0, 0], res
    out2 = res[0][1]
    assert res[1][1] == ""  # the worker prints nothing
    assert _rows(one) == _rows(two)  # the same architectures, scores and order
    strip = re.compile(r"in [0-9.]+ s|journal \S+|\(\d+ computed, \d+ from")
    assert strip.sub("", out1) == strip.sub("", out2)


@pytest.mark.parametrize("algo", ["rea", "reinforce"])
def test_batch_synchronous_algorithms_complete_on_two_ranks(tmp_path, algo):
    argv = ["search", "--algo", algo, "--budget", "8", *COMMON, "--db", str(tmp_path / "a.db")]
    if algo == "rea":
        argv += ["--population", "4", "--sample-size", "2"]
    res = _finish(_ranks(argv))
    assert [r[0] for r in res] == [0, 0], res
    assert "8 evaluations" in res[0][1] and len(_rows(tmp_path / "a.db")) == 8


def test_workers_option_starts_the_ranks(tmp_path, capsys):
    """``--workers 2``: the same command through torch's launcher (torchrun --standalone)."""
    db = tmp_path / "w.db"
    rc, out1, _ = run(capsys, "evaluate", "--archs", "4", *COMMON, "--db", str(tmp_path / "1.db"))
    p = subprocess.run([sys.executable, "-m", "fastntk", "evaluate", "--archs", "4", *COMMON,
                        "--db", str(db), "--workers", "2"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert _rows(tmp_path / "1.db") == _rows(db)
    assert p.stdout.count("kendall_tau") == 1  # rank 0 alone reports


def test_a_killed_worker_stops_rank_0_and_the_rerun_resumes(tmp_path, capsys):
    db = tmp_path / "k.db"
    argv = ["search", "--algo", "random", "--budget", "40", *COMMON, "--db", str(db)]
    procs = _ranks(argv)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        if db.exists() and len(_rows(db)) >= 4:
            break
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    (rc0, _, err0), _ = _finish(procs)
    assert rc0 == 2 and "a rank stopped" in err0, err0
    kept = _rows(db)
    assert 4 <= len(kept) < 40
    res = _finish(_ranks(argv))
    assert [r[0] for r in res] == [0, 0], res
    done = re.search(r"(\d+) computed, (\d+) from", res[0][1])
    assert done and int(done.group(1)) == 40 - len(kept) and int(done.group(2)) == len(kept)
    rc, out, _ = run(capsys, "search", "--algo", "random", "--budget", "40", *COMMON, "--db",
                     str(tmp_path / "ref.db"))  # fmt: skip
    assert _rows(db) == _rows(tmp_path / "ref.db")
