"""The fastntk command line on synthetic data, tiny budgets and batch 8.

Most tests swap the registry's NB201 space for a narrow one (C=4, N=1: same arch
strings and ground truth, a ~40x cheaper network) so the whole file stays fast on
the 2-core CI machine; ``test_score_real_nb201`` runs the real network once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
from bench_scripts import load_bench
from cli_run import ARCH, DATA, run

from fastntk import cli
from fastntk.search import Journal
from fastntk.spaces import registry
from fastntk.spaces.nb201 import NB201Space

BENCH_MODELS = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_models.py")


@pytest.mark.slow
def test_score_real_nb201(capsys):
    rc, out, err = run(
        capsys, "score", "--space", "nb201", "--arch", ARCH, "--metric", "lga", *DATA
    )
    assert rc == 0, err
    assert "lga" in out and "CIFAR-10 93.65%" in out and "rank 272 of 15625" in out


def test_score_is_reproducible(capsys, tiny_nb201):
    outs = []
    for _ in range(2):
        rc, out, err = run(
            capsys, "score", "--arch", ARCH, "--metric", "lga,cond,fnorm", "--seed", "3", *DATA
        )
        assert rc == 0, err
        outs.append([ln for ln in out.splitlines() if not ln.startswith("time")])
    assert outs[0] == outs[1]
    assert any(ln.strip().startswith("cond") for ln in outs[0])


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory):
    """One journal for the search/evaluate tests: same seed and settings, so later
    commands reuse earlier evaluations (and exercise the cache across commands)."""
    return tmp_path_factory.mktemp("cli") / "shared.db"


SEARCH = ["--metric", "lga,fnorm", "--seed", "0", *DATA]


@pytest.mark.parametrize("algo", ["random", "rea", "prune", "reinforce"])
def test_search_each_algo(capsys, tiny_nb201, shared_db, algo):
    extra = ["--population", "2", "--sample-size", "2"] if algo == "rea" else []
    argv = [
        "search",
        "--algo",
        algo,
        "--budget",
        "2",
        "--db",
        str(shared_db),
        "--progress",
        *extra,
        *SEARCH,
    ]  # (--progress: stderr is not a terminal here)
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert "2 evaluations" in out
    assert "best |" in out and "true accuracy" in out and "ImageNet16-120" in out
    assert "eval/s" in err  # progress bar on stderr
    if algo == "prune":  # it scores supernets, then the final arch: labelled as such
        assert "best supernet:" in err and "final arch" in err
    else:
        assert "best:" in err
    with Journal(shared_db) as j:
        rows = j.rows(space="nb201(C=4,N=1)")  # the narrow network's own key
    assert rows and rows[0]["settings"]["data"] == "synthetic"
    assert rows[0]["settings"]["batch_size"] == 8
    if algo == "random":  # resume: everything served from the journal, same best
        rc2, out2, err2 = run(capsys, *argv)
        assert rc2 == 0, err2
        assert "0 computed, 2 from the journal" in out2
        assert out2.splitlines()[1] == out.splitlines()[1]


def test_search_time_budget(capsys, tiny_nb201, shared_db):
    rc, out, err = run(
        capsys,
        "search",
        "--time-budget",
        "0.5",
        "--no-progress",
        "--threads",
        "1",
        "--db",
        str(shared_db),
        *SEARCH,
    )
    assert rc == 0, err
    assert "stopped: time" in out and err == ""


def test_evaluate_prints_correlations_and_plot(capsys, tiny_nb201, shared_db, tmp_path):
    png = tmp_path / "tau.png"
    rc, out, err = run(
        capsys,
        "evaluate",
        "--archs",
        "3",
        "--dataset",
        "cifar100",
        "--plot",
        str(png),
        "--db",
        str(shared_db),
        *SEARCH,
        "--bn",
        "eval",
    )
    assert rc == 0, err
    assert "kendall_tau" in out and "spearman_rho" in out
    for name in ("lga", "fnorm", "borda"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        tau, rho = map(float, line.split()[1:3])
        assert -1 <= tau <= 1 and -1 <= rho <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_orients_lower_is_better_metrics(capsys, tiny_nb201, monkeypatch):
    """τ and ρ with accuracy, each metric oriented so that higher predicts better: scores
    equal to the accuracy (lga, higher is better) and to minus it (cond, lower is better)
    both rank the archs as the accuracy does, τ = ρ = 1, and so does their Borda count
    (an orientation flipped for lower-is-better metrics gives -1 for cond)."""
    from fastntk.search import Scorer, scoring
    from fastntk.spaces import nb201

    def space_scorer(space, metrics, **kw):
        def fn(arch):
            acc = nb201.accuracy(space.encode(arch), "cifar100")
            return {"lga": acc / 100, "cond": 1000.0 - acc}

        return Scorer(fn, metrics)

    monkeypatch.setattr(scoring, "space_scorer", space_scorer)
    rc, out, err = run(capsys, "evaluate", "--archs", "8", "--dataset", "cifar100", "--metric",
                       "lga,cond", *DATA)  # fmt: skip
    assert rc == 0, err
    for name in ("lga", "cond", "borda"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        tau, rho = map(float, line.split()[1:3])
        assert tau == pytest.approx(1.0) and rho == pytest.approx(1.0), line


def test_evaluate_plot_names_negated_values(capsys, tiny_nb201, shared_db, tmp_path):
    """A lower-is-better metric is plotted negated (oriented): its label says so."""
    png = tmp_path / "tr.png"
    rc, out, err = run(capsys, "evaluate", "--archs", "3", "--metric", "trainability",
                       "--plot", str(png), "--db", str(shared_db), "--data", "synthetic",
                       "--batch-size", "4")  # fmt: skip
    assert rc == 0, err
    assert "(x: -trainability -" in out


def test_evaluate_plot_is_drawn_by_matplotlib(capsys, tiny_nb201, shared_db, tmp_path, monkeypatch):
    """The scatter plot is matplotlib's PNG: labelled axes with ticks, and a title naming
    the metric (here the Borda count), the data set and the printed Kendall τ."""
    import matplotlib.image

    from fastntk.cli import plot

    figs, real = [], plot.scatter
    monkeypatch.setattr(plot, "scatter", lambda *a, **k: figs.append(real(*a, **k)) or figs[-1])
    png = tmp_path / "p.png"
    rc, out, err = run(
        capsys,
        "evaluate",
        "--archs",
        "3",
        "--dataset",
        "cifar100",
        "--plot",
        str(png),
        "--db",
        str(shared_db),
        *SEARCH,
        "--bn",
        "eval",
    )
    assert rc == 0, err
    tau = float(next(ln for ln in out.splitlines() if ln.strip().startswith("borda")).split()[1])
    (fig,) = figs
    (ax,) = fig.axes
    assert ax.get_title() == (f"Borda(lga, fnorm) vs cifar100 accuracy\n"
                              f"3 NB201 archs, Kendall τ {tau:.4f}")  # fmt: skip
    assert ax.get_xlabel() == "Borda(lga, fnorm)"
    assert ax.get_ylabel() == "cifar100 test accuracy (%)"
    assert len(ax.get_xticks()) > 1 and len(ax.get_yticks()) > 1
    assert matplotlib.image.imread(str(png)).shape[:2] == (450, 600)  # plot.FIGSIZE * DPI


def test_evaluate_plot_without_matplotlib_fails_before_scoring(
    capsys, tiny_nb201, tmp_path, monkeypatch
):
    import sys

    from fastntk import metrics

    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    monkeypatch.setattr(metrics, "compute_metrics", lambda *a, **k: pytest.fail("scored"))
    png = tmp_path / "p.png"
    rc, out, err = run(capsys, "evaluate", "--archs", "2", "--metric", "fnorm", "--plot",
                       str(png), *DATA)  # fmt: skip
    assert rc == 2 and out == "" and not png.exists()
    assert err == ("fastntk evaluate: error: --plot needs matplotlib, which is not installed: "
                   "pip install matplotlib (or pip install fastntk[plot])\n")  # fmt: skip


@pytest.fixture(scope="module")
def bench_models():
    """bench/bench_models.py (the ``fastntk bench`` of before), imported from its path."""
    return load_bench("bench_models")


def run_bench(capsys, bench_models, *argv):
    rc = bench_models.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_bench_table_and_csv(capsys, tmp_path, monkeypatch, bench_models):
    # run each measurement in-process instead of a fresh interpreter (importing torch
    # costs seconds per process on the CI machine)
    def fake_run(script, spec, timeout=None):
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            bench_models.child(json.dumps(spec))
        return bench_models._child.parse(buf.getvalue())

    monkeypatch.setattr(bench_models._child, "run", fake_run)
    # a narrow NB201 network (C=4, N=1) keeps this fast; real sizes: see the report/README
    from fastntk.spaces.nb201 import build_model

    monkeypatch.setattr(bench_models, "bench_model", lambda name: build_model(ARCH, C=4, N=1))
    csv_path = tmp_path / "b.csv"
    rc, out, err = run_bench(
        capsys,
        bench_models,
        "--model",
        "nb201",
        "--n",
        "2",
        "--method",
        "auto,loop",
        "--csv",
        str(csv_path),
    )
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:10] == [
        "model",
        "method",
        "n",
        "output",
        "time_s",
        "samples_per_s",
        "gram_tflops",
        "peak_mib",
        "memory",
        "device",
    ]
    assert "process_peak_rss" in lines[1]
    assert len([ln for ln in lines if ln.startswith("nb201")]) == 2
    rows = csv_path.read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("model,method,n")
    assert float(rows[1].split(",")[4]) > 0
    assert float(rows[1].split(",")[6]) > 0  # the Gram step's TFLOP/s, from fastntk.profile()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "vgg"], "invalid choice"),
        (["--n", "0"], "--n"),
        (["--n", "2", "--method", "bogus"], "unknown NTK method"),
    ],
)
def test_bench_errors_exit_2_with_one_line(capsys, bench_models, argv, needle):
    rc, out, err = run_bench(capsys, bench_models, *argv)
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["score", "--space", "nasbench101", "--arch", ARCH, "--metric", "lga"], "known spaces"),
        (["score", "--arch", ARCH, "--metric", "lgaa"], "unknown metric"),
        (["score", "--arch", "|nor_conv_3x3~0|+|bogus~0|", "--metric", "lga"], "node groups"),
        (["score", "--arch", ARCH.replace("~1|", "~2|", 1), "--metric", "lga"], "node"),
        (["search", "--metric", "lga", "--budget", "0"], "--budget must be > 0"),
        (["search", "--metric", "lga", "--budget", "-5"], "--budget"),
        (["search", "--metric", "lga", "--time-budget", "0"], "--time-budget"),
        (["search", "--metric", "lga"], "--budget"),
        (["search", "--metric", "lga", "--budget", "2", "--algo", "bayes"], "unknown search"),
        (["search", "--metric", "lga", "--budget", "2", "--db", "/proc/nope/x.db"], "journal"),
        (["search", "--metric", "lga", "--budget", "2", "--db", ""], "--db needs a database"),
        (["evaluate", "--metric", "lga", "--archs", "2", "--db", " "], "--db needs a database"),
        (
            [
                "search",
                "--metric",
                "lga",
                "--budget",
                "2",
                "--algo",
                "prune",
                "--samples-per-op",
                "3",
            ],
            "samples_per_op applies to per-op pruning",
        ),
        (["evaluate", "--metric", "lga", "--archs", "0"], "--archs"),
        (["evaluate", "--metric", "lga", "--archs", "2", "--space", "darts"], "ground-truth"),
        (["evaluate", "--metric", "lga", "--archs", "2", "--dataset", "mnist"], "dataset"),
    ],
)
def test_errors_exit_2_with_one_line(capsys, argv, needle):
    rc, out, err = run(capsys, *argv, *DATA[:2])
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_demo_prints_kernel_times_and_paths(capsys):
    """The README's main job (``make demo``) on a small batch: kernel, both timings, the warm
    call's phases, spectrum and paths."""
    from fastntk.cli import demo

    assert demo.main(["--n", "16"]) == 0
    out = capsys.readouterr().out
    assert "Θ             (16, 16) torch.float32" in out
    assert "first call" in out and "warm call" in out and "samples/s" in out
    assert "seconds by phase: " in out and " forward " in out and "per_sample" in out
    assert "λmax" in out and "cond" in out and "LGA" in out
    assert "rule:ConvRule" in out and "rule:BatchNormRule" in out


def test_bench_stopped_by_a_time_limit_keeps_its_rows(tmp_path):
    """The GPU suite runs bench/bench_models.py under timeout(1): the CSV was written at the
    end only, so a stopped run left none (and its measuring child ran on). Rows are
    written as they are measured; SIGTERM stops the child and prints the table so far."""
    import signal
    import sys
    import time

    out = tmp_path / "b.csv"
    p = subprocess.Popen([sys.executable, BENCH_MODELS, "--model", "nb201", "--n", "2",
                          "--method", "auto,loop,vmap,auto", "--repeat", "1", "--csv", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        not out.exists() or len(out.read_text().splitlines()) < 2
    ):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    rows = out.read_text().splitlines()
    assert rows[0].startswith("model,method,n") and 2 <= len(rows) < 5, rows
    assert "time_s" in stdout and "interrupted" in stderr


def test_prune_on_the_benchmark_supernet(capsys, tmp_path):
    """NB201's supernets average their ops on every edge: float32 kernels stay finite in
    eval mode (summed, they overflowed, and prune ran in float64)."""
    db = tmp_path / "p.db"
    rc, out, err = run(capsys, "search", "--algo", "prune", "--metric", "fnorm,lga",
                       "--budget", "2", "--no-progress", "--db", str(db), "--data", "synthetic",
                       "--batch-size", "4")  # fmt: skip
    assert rc == 0, err
    assert "2 evaluations (2 computed" in out
    with Journal(db) as j:
        rows = j.rows(space="nb201")
    assert len(rows) == 2 and all("dtype" not in r["settings"] for r in rows)
    assert all(math.isfinite(v) for r in rows for v in r["metrics"].values())


@pytest.mark.parametrize(
    "metric,dtype,bn,expect",
    [
        ("ncn", None, "eval", "float64"),
        ("fnorm,cond", None, "eval", "float64"),
        ("vintk", None, "eval", "float64"),
        ("fnorm", None, "eval", None),
        ("ncn", "float32", "eval", None),
        ("ncn", None, "per_sample", None),
        ("ncn", "float64", "per_sample", "float64"),
    ],
)
def test_condition_number_metrics_are_scored_in_float64(capsys, tmp_path, metric, dtype, bn,
                                                        expect):  # fmt: skip
    """A float32 eval-mode kernel resolves λmax/λmin only up to 1/(N·eps32): ncn, cond and
    vintk are scored in float64 there unless --dtype says otherwise (the journal records
    it); per-sample BatchNorm (the NAS preset) keeps them within float32's reach."""
    db = tmp_path / "d.db"
    argv = ["search", "--algo", "random", "--metric", metric, "--budget", "1", "--no-progress",
            "--db", str(db), "--data", "synthetic", "--batch-size", "4", "--bn", bn]  # fmt: skip
    rc, out, err = run(capsys, *argv, *(["--dtype", dtype] if dtype else []))
    assert rc == 0, err
    with Journal(db) as j:
        (row,) = j.rows(space="nb201")
    assert row["settings"].get("dtype") == expect


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["score", "--arch", ARCH, "--metric", "fnorm", "--seed", "-1"], "--seed must be in"),
        (["score", "--arch", ARCH, "--metric", "fnorm", "--seed", str(2**70)], "--seed must be in"),
        (
            ["evaluate", "--metric", "fnorm", "--archs", "2", "--plot", "/nonexistent/d/p.png"],
            "not a writable folder",
        ),
        (
            ["search", "--metric", "fnorm", "--budget", "1", "--algo", "reinforce", "--lr", "-1"],
            "--lr must be > 0, got -1",
        ),
        (["demo", "--n", "0"], "--n must be between 1 and 1000"),
        (["demo", "--n", "2", "--arch", "bad"], "node groups"),
        (["demo", "--n", "2", "--output", "full"], "output='full' is the API's"),  # (a traceback)
        (["demo", "--n", "2", "--output", "foo"], "--output must be sum, trace, mean"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, msg):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and msg in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3  # usage line(s) + the error


def test_demo_through_the_cli_takes_an_integer_logit(capsys):
    rc, out, err = run(capsys, "demo", "--n", "2", "--output", "3")
    assert rc == 0, err
    assert "output=3," in out


def test_seeds_checked_by_the_data_loaders():
    from fastntk import data
    from fastntk.errors import OptionError

    for bad in (-1, 2**70, 1.5, True):
        with pytest.raises(OptionError, match="seed must be an int"):
            data.load("cifar10", 2, seed=bad)
        with pytest.raises(OptionError, match="seed must be an int"):
            data.synthetic(2, seed=bad)


def test_differently_sized_networks_do_not_share_the_journal(
    capsys, tiny_nb201, tmp_path, monkeypatch
):
    monkeypatch.setitem(registry._SPACES, "nb201-c2", lambda: NB201Space(C=2, N=1))
    db = str(tmp_path / "j.db")
    argv = ["search", "--metric", "fnorm", "--budget", "2", "--no-progress", "--db", db, *DATA]
    outs = []
    for space in ("nb201", "nb201-c2", "nb201"):
        rc, out, err = run(capsys, *argv, "--space", space)
        assert rc == 0, err
        outs.append(out.splitlines())
    assert "(2 computed, 0 from the journal" in outs[1][0]  # not the C=4 network's scores
    assert "(0 computed, 2 from the journal" in outs[2][0]
    assert outs[0][2] == outs[2][2] != outs[1][2]  # the fnorm values
    with Journal(db) as j:
        assert {r["space"] for r in j.rows()} == {"nb201(C=4,N=1)", "nb201(C=2,N=1)"}


def test_ctrl_c_before_the_guarded_command(capsys, monkeypatch):
    """Ctrl-C while ``python -m fastntk`` / the console script starts (loading the command
    line, tuning the allocator, parsing): one line and status 130, no traceback."""
    import runpy
    import sys

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["fastntk", "search", "--metric", "fnorm"])
    monkeypatch.setattr(cli, "tune_own_process", interrupt)
    try:
        assert cli.entry() == 130
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped cli.entry")
    assert capsys.readouterr().err == "\nfastntk search: interrupted\n"
    monkeypatch.setattr(cli, "entry", interrupt)
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_module("fastntk.__main__", run_name="__main__")
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped fastntk/__main__.py")
    assert e.value.code == 130
    assert capsys.readouterr().err == "\nfastntk search: interrupted\n"


def test_ctrl_c_while_torch_loads():
    """``import fastntk`` imported torch (seconds): a Ctrl-C then, before
    ``fastntk/__main__.py`` could guard anything, printed a traceback."""
    import os
    import signal
    import sys
    import time

    code = "import sys, fastntk; print('torch' in sys.modules, flush=True)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "False\n"  # the package alone is cheap
    # ... and what it offered eagerly is still there (functions, and submodules)
    code = (
        "import fastntk; print(callable(fastntk.ntk), callable(fastntk.explain), "
        "fastntk.errors.InputError.__name__, callable(fastntk.metrics.fnorm))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "True True InputError True\n"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "fastntk", "demo"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    # -X importtime writes one line per module imported: wait for torch's first ones
    seen = ""
    deadline = time.monotonic() + 60
    while "torch" not in seen and time.monotonic() < deadline:
        seen += p.stderr.readline()
    assert "torch" in seen
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    err = "\n".join(ln for ln in err.splitlines() if not ln.startswith("import time:"))
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "fastntk demo: interrupted", err


def test_prune_candidates_share_the_full_supernets_weights(capsys, monkeypatch, tmp_path):
    """TE-NAS scores each pruned supernet with the original's weights: every candidate's
    stem and shared ops equal the full supernet's (each used to get its own init), and the
    journal key says so."""
    import torch

    from fastntk import metrics

    stems, real = [], metrics.compute_metrics

    def spy(model, *a, **kw):
        stems.append((model.stem[0].weight.detach().clone(), model))
        return real(model, *a, **kw)

    monkeypatch.setattr(metrics, "compute_metrics", spy)
    db = tmp_path / "p.db"
    rc, out, err = run(capsys, "search", "--algo", "prune", "--metric", "fnorm", "--budget", "4",
                       "--no-progress", "--db", str(db), "--data", "synthetic",
                       "--batch-size", "2", "--dtype", "float32")  # fmt: skip
    assert rc == 0, err
    supers = [(w, m) for w, m in stems if hasattr(m.cells[0].layers[0], "ops")]
    assert len(supers) == 3
    assert all(torch.equal(w, supers[0][0]) for w, _ in supers)
    a, b = supers[0][1], supers[1][1]  # shared ops of two candidates: the same weights
    sd_a, sd_b = a.state_dict(), b.state_dict()
    shared = [k for k in sd_a if k in sd_b and "ops." in k]
    assert shared and all(torch.equal(sd_a[k], sd_b[k]) for k in shared)
    with Journal(db) as j:
        assert {r["settings"]["supernet"] for r in j.rows()} == {"mean, shared weights"}


def test_demo_spectrum_of_a_singular_kernel(capsys):
    """An all-none network's kernel is singular and constant: cond inf by the metrics'
    rule (it printed 8e+301 from lmax / max(lmin, 1e-300)), ‖Θ‖_F without overflow, and
    mean(Θ) even though LGA is undefined."""
    none = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    rc, out, err = run(capsys, "demo", "--n", "8", "--arch", none)
    assert rc == 0, err
    assert "cond inf" in out and "LGA undefined" in out and "mean(Θ) 10" in out


def test_journal_keys_on_revised_metric_definitions(capsys, tiny_nb201, tmp_path):
    """S_e and S_g changed their values for networks whose output ignores the input
    (metrics.REVISIONS): a journal row stored before (settings without the revision) is
    not served as today's score; metrics never revised keep their old key."""
    db = tmp_path / "r.db"
    argv = ["search", "--algo", "random", "--budget", "2", "--no-progress", "--seed", "0",
            "--db", str(db), *DATA]  # fmt: skip
    rc, out, err = run(capsys, *argv, "--metric", "ntk_score")
    assert rc == 0, err
    with Journal(db) as j:
        rows = j.rows(space="nb201(C=4,N=1)")
        assert {json.dumps(r["settings"].get("revisions"), sort_keys=True) for r in rows} == {
            '{"expressivity": 2, "generalization": 2}'
        }
        for r in rows:  # the same rows as written before the revision, with other values
            old = {k: v for k, v in r["settings"].items() if k != "revisions"}
            j.record("nb201(C=4,N=1)", r["arch"], old, {k: -1e9 for k in r["metrics"]})
        stale = j.rows(space="nb201(C=4,N=1)")
    assert len(stale) == 4
    rc, out2, err = run(capsys, *argv, "--metric", "ntk_score")
    assert rc == 0, err
    assert (
        "0 computed, 2 from the journal" in out2
        and "-1e+09" not in out2
        and "-1000000000" not in out2
    )
    rc, out3, err = run(capsys, *argv, "--metric", "lga,fnorm")
    with Journal(db) as j:
        plain = [r for r in j.rows(space="nb201(C=4,N=1)") if "lga" in r["metrics"]]
    assert plain and all("revisions" not in r["settings"] for r in plain)


def test_prune_stopped_inside_a_round_says_so(capsys, tiny_nb201, tmp_path):
    """--budget 3 ends prune inside its first round: the final ops are drawn at random,
    which the summary says (it said so only on the progress line, gone with --no-progress)."""
    rc, out, err = run(capsys, "search", "--algo", "prune", "--metric", "fnorm", "--budget", "3",
                       "--no-progress", "--db", str(tmp_path / "p.db"), *DATA)  # fmt: skip
    assert rc == 0, err
    assert (
        "pruning unfinished: round 1 unfinished, its 2 evaluations unused; ops left drawn at random"
        in out
    )


def test_score_of_a_supernet(capsys, tiny_nb201):
    """A supernet string is scored (as prune scores it); it has no benchmark accuracy,
    which the output says, instead of an 'unknown op' error after the metric lines."""
    sup = "|skip_connect&nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
    rc, out, err = run(
        capsys, "score", "--space", "nb201", "--arch", sup, "--metric", "fnorm", *DATA
    )
    assert rc == 0, err
    assert "fnorm" in out and "NAS-Bench-201 holds no accuracy" in out and "time " in out


def test_search_notes_options_it_does_not_use(capsys, tiny_nb201, tmp_path):
    base = ["search", "--metric", "fnorm", "--no-progress", "--db", str(tmp_path / "n.db"), *DATA]
    rc, out, err = run(capsys, *base, "--algo", "random", "--budget", "2", "--population", "50",
                       "--lr", "3")  # fmt: skip
    assert rc == 0, err
    assert "note: --population is an option of --algo rea; --algo random does not use it" in err
    assert "note: --lr is an option of --algo reinforce" in err
    rc, out, err = run(capsys, *base, "--algo", "rea", "--budget", "3", "--population", "4",
                       "--sample-size", "2")  # fmt: skip
    assert rc == 0, err
    assert "--population 4 >= --budget 3: REA samples its whole budget at random" in err
    rc, out, err = run(capsys, *base, "--algo", "rea", "--budget", "3", "--population", "2",
                       "--sample-size", "2")  # fmt: skip
    assert rc == 0 and "note" not in err, err


@pytest.mark.parametrize(
    "budget,population,sample_size",
    [(100, 20, 5), (1000, 20, 5), (40, 8, 5), (10, 2, 2), (None, 20, 5)],
)
def test_rea_defaults_scale_with_a_short_budget(budget, population, sample_size):
    """REA, the default algorithm: population 20 and tournament 5 as measured at budget
    100; a fifth of a smaller budget (at least 2), so that a short search mutates too."""
    from fastntk.cli import commands
    from fastntk.cli.args import parser

    argv = ["search", "--time-budget", "1"] + ([] if budget is None else ["--budget", str(budget)])
    args = parser().parse_args(argv)
    assert args.algo == "rea"
    commands._algo_options(args)
    assert (args.population, args.sample_size) == (population, sample_size)


def test_rea_derived_population_holds_a_given_tournament():
    """A derived population never falls under a given --sample-size: ``--budget 10
    --sample-size 5`` runs a population of 5, not an error about a population the user
    never gave."""
    from fastntk.cli import commands
    from fastntk.cli.args import parser

    args = parser().parse_args(["search", "--budget", "10", "--sample-size", "5"])
    commands._algo_options(args)
    assert (args.population, args.sample_size) == (5, 5)
    args = parser().parse_args(["search", "--time-budget", "60", "--sample-size", "30"])
    commands._algo_options(args)
    assert (args.population, args.sample_size) == (30, 30)


def test_rea_population_past_the_budget_gets_a_note(capsys):
    """A tournament larger than the budget makes REA a random search: a note says so,
    whether the population was given or derived from --sample-size."""
    from fastntk.cli import commands
    from fastntk.cli.args import parser

    args = parser().parse_args(["search", "--budget", "10", "--sample-size", "50"])
    commands._algo_options(args)
    assert args.population == 50
    err = capsys.readouterr().err
    assert "the population (--sample-size) 50 >= --budget 10: REA samples its whole" in err
    args = parser().parse_args(["search", "--budget", "2"])  # (the floor of 2: no note)
    commands._algo_options(args)
    assert args.population == 2 and "note" not in capsys.readouterr().err


def test_metric_help_names_the_default_score():
    """--metric's help names the NAS default and the nas_rank group (the parser imports
    nothing of the package, so its text is written out; this holds it to
    fastntk.metrics)."""
    from fastntk.cli import args
    from fastntk.metrics import NAS_METRICS, expand_metrics

    assert f"(default: {','.join(NAS_METRICS)}, the NAS default score;" in args._METRIC_HELP
    rank = ",".join(expand_metrics("nas_rank"))
    assert f"nas_rank: {rank}," in args._METRIC_HELP
