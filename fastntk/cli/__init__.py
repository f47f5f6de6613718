"""The ``fastntk`` command line: ``score``, ``search``, ``evaluate``, ``demo``.

Examples::

    fastntk score --space nb201 --metric lga,cond \
        --arch '|nor_conv_3x3~0|+|none~0|nor_conv_1x1~1|+|skip_connect~0|none~1|none~2|'
    fastntk search --space nb201 --algo rea --metric lga --budget 100 --db runs.db
    fastntk evaluate --space nb201 --metric lga,ncn --archs 50 --plot tau.png
    fastntk demo --n 256 --output trace

Errors a user can make (unknown space, metric or algorithm, malformed arch
string, a budget <= 0, an unwritable database, ...) exit with status 2 and one
line on stderr, without a traceback.

Reproducibility: the batch is ``fastntk.data.load(data, batch_size, seed=seed)``
and each network is initialised with ``torch.manual_seed(crc32("seed:arch"))``,
so a score depends only on (space, arch, metrics, data, batch size, BN mode,
seed): exactly the settings the search journal keys on.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any

from fastntk.errors import FastNTKError, OptionError

__all__ = ["main"]

NB201_DATASETS = (("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"),
                  ("imagenet16-120", "ImageNet16-120"))

# The network of the brief's measurements (NTK_BRIEF.md, section 4).
BENCH_NB201_ARCH = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|"
    "avg_pool_3x3~2|"
)


# ---------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{what} must be > 0, got {v}")
        return v

    return parse


def _nonneg_int(what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {s!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{what} must be >= 0, got {v}")
        return v

    return parse


def _positive_float(what: str, unit: str = ""):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {s!r}") from None
        if not v > 0 or math.isinf(v):
            raise argparse.ArgumentTypeError(f"{what} must be > 0{unit}, got {s}")
        return v

    return parse


def seed_arg(s: str) -> int:
    """A ``--seed`` value: an integer in [0, 2**63)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {s!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"--seed must be in [0, 2**63), got {v}")
    return v


def _db_path(s: str) -> str:
    """A ``--db`` value: a file name (an empty one, ``--db "$UNSET"``, is an error)."""
    if not s.strip():
        raise argparse.ArgumentTypeError("--db needs a database file name, got an empty string")
    return s


def _add_data_args(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=batch,
                   help=f"samples per NTK batch (default {batch})")
    p.add_argument("--data", default="cifar10", choices=("cifar10", "synthetic"),
                   help="bundled CIFAR-10 sample or seeded synthetic images")
    p.add_argument("--bn", choices=("eval", "batch", "per_sample"),
                   help="BatchNorm semantics of the kernels (default per_sample, the NAS "
                        "preset fastntk.metrics.NAS: it measured best on NAS-Bench-201)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of data, init and search")
    p.add_argument("--dtype", choices=("float32", "float64"),
                   help="dtype of the kernels (default float32; with --bn eval, float64 "
                        "for ncn, cond and vintk, whose condition numbers float32 cannot "
                        "resolve beyond 1/(N*eps))")
    p.add_argument("--lga-epochs", type=_nonneg_int("--lga-epochs"), default=1,
                   help="lga_t: epochs of the LGA paper's training before the kernel "
                        "(default 1)")
    p.add_argument("--lga-train", type=_positive_int("--lga-train"), default=512,
                   help="lga_t: training images, the next ones of the data after the "
                        "scored batch (default 512)")
    p.add_argument("--lga-batch", type=_positive_int("--lga-batch"), default=64,
                   help="lga_t: training minibatch size (default 64)")
    _add_threads_arg(p)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int("--threads"),
                   help="torch intra-op threads (default: torch's choice; on a shared, "
                        "loaded machine 1 avoids OpenMP oversubscription)")


_METRIC_HELP = ("metric name(s), comma separated; several are combined by a Borda count "
                "(default: ncn,lga,num_params, the NAS default score)")


def _parser() -> argparse.ArgumentParser:
    top = _Parser(prog="fastntk", description="Empirical NTKs and training-free NAS.")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # listed for --help; `fastntk demo ...` goes to fastntk.demo before this parser (main)
    sub.add_parser("demo", add_help=False,
                   help="the NTK of a NAS-Bench-201 network on real CIFAR-10 images "
                        "(fastntk demo --help)")  # fmt: skip
    p = sub.add_parser("score", help="metrics of one architecture")
    p.add_argument("--space", default="nb201")
    p.add_argument("--arch", required=True, help="architecture string of the space")
    p.add_argument("--metric", help=_METRIC_HELP)
    _add_data_args(p, 64)

    p = sub.add_parser("search", help="training-free architecture search")
    p.add_argument("--space", default="nb201")
    p.add_argument("--algo", default="random", help="random | rea | prune | reinforce")
    p.add_argument("--metric", help=_METRIC_HELP)
    p.add_argument("--budget", type=_positive_int("--budget"),
                   help="number of architecture evaluations")
    p.add_argument("--time-budget", type=_positive_float("--time-budget", " seconds"),
                   help="wall-clock seconds")
    p.add_argument("--db", type=_db_path,
                   help="SQLite journal: resumable search and result store")
    p.add_argument("--population", type=_positive_int("--population"),
                   help="REA population size (default 20)")
    p.add_argument("--sample-size", type=_positive_int("--sample-size"),
                   help="REA tournament size (default 5)")
    p.add_argument("--lr", type=_positive_float("--lr"),
                   help="REINFORCE learning rate (default 0.2)")
    p.add_argument("--samples-per-op", type=_positive_int("--samples-per-op"),
                   help="pruning of spaces without supernets (darts, resnet, vit): "
                        "architectures scored per (decision, op) (default 1); nb201 is "
                        "pruned on supernets, where it must stay 1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_data_args(p, 64)

    p = sub.add_parser("evaluate", help="rank correlation of metrics with true accuracy")
    p.add_argument("--space", default="nb201")
    p.add_argument("--metric", help=_METRIC_HELP)
    p.add_argument("--archs", type=_positive_int("--archs"), required=True,
                   help="number of sampled architectures")
    p.add_argument("--dataset", default="cifar10",
                   help="ground truth: cifar10 | cifar100 | imagenet16-120")
    p.add_argument("--plot", help="scatter plot PNG (metric vs accuracy)")
    p.add_argument("--db", type=_db_path, help="SQLite journal to reuse/store the scores")
    _add_data_args(p, 64)

    return top


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _expand_metrics(spec: str | None) -> list[str]:
    """Metric names of a comma-separated spec (groups expanded); None: the NAS default."""
    from fastntk import metrics as M

    return M.expand_metrics(M.NAS_METRICS if spec is None else spec)


def _scorer(space, metrics: list[str], args):
    """The scorer of a command's options; a note on stderr for each metric that the
    measured evidence shows to rank backwards (or barely) in the chosen BN mode."""
    from fastntk import metrics as M
    from fastntk.search.scoring import notes, space_scorer

    bn = args.bn or M.NAS["bn"]
    for line in notes(metrics, bn):
        print(f"fastntk {args.command}: note: {line}", file=sys.stderr)
    return space_scorer(space, metrics, data=args.data, batch_size=args.batch_size, bn=bn,
                        seed=args.seed, dtype=args.dtype, lga_epochs=args.lga_epochs,
                        lga_train=args.lga_train, lga_batch=args.lga_batch,
                        supernet_weights=getattr(args, "algo", None) == "prune")  # fmt: skip


def _is_supernet(space, enc: str) -> bool:
    from fastntk.spaces import nb201

    return hasattr(space, "full_supernet") and nb201.SUPER_SEP in enc


def _nb201_truth(arch: str) -> list[str]:
    from fastntk.spaces import nb201

    accs = "  ".join(f"{label} {nb201.accuracy(arch, d):.2f}%" for d, label in NB201_DATASETS)
    lines = [f"  true accuracy (200 epochs): {accs}"]
    for d, label in NB201_DATASETS:
        lines.append(f"  {label}: rank {nb201.rank(arch, d)} of {nb201.NUM_ARCHS} "
                     f"(better than {nb201.percentile(arch, d):.2f}% of the space)")
    return lines


def _fmt(v: float) -> str:
    return f"{v:.6g}"


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _cmd_score(args) -> int:
    from fastntk.spaces.registry import get_space

    space = get_space(args.space)
    metrics = _expand_metrics(args.metric)
    arch = space.decode(args.arch)
    enc = space.encode(arch)
    t = time.perf_counter()
    scorer = _scorer(space, metrics, args)
    values = scorer(arch)
    dt = time.perf_counter() - t
    print(f"space {space.name}  arch {enc}")
    print(f"data {args.data}, batch {args.batch_size}, bn {scorer.settings['bn']}, "
          f"seed {args.seed}")
    width = max(len(m) for m in metrics)
    for m in metrics:
        print(f"  {m:<{width}}  {_fmt(values[m])}")
    if _is_supernet(space, enc):
        print("a supernet (several ops on an edge): NAS-Bench-201 holds no accuracy for it")
    elif space.name == "nb201":
        print("\n".join(_nb201_truth(enc)))
    print(f"time {dt:.2f} s")
    return 0


# Each algorithm's own options and their defaults (None in the parser: given or not).
_ALGO_OPTIONS = {"rea": {"population": 20, "sample_size": 5}, "reinforce": {"lr": 0.2},
                 "prune": {"samples_per_op": 1}}  # fmt: skip


def _algo_options(args) -> None:
    """Fill in the defaults of the algorithm's options; a note on stderr for an option
    another algorithm takes (ignored) and for an REA population that the budget never
    gets past (no mutation: random search)."""
    for algo, opts in _ALGO_OPTIONS.items():
        for name, default in opts.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
            elif algo != args.algo:
                flag = "--" + name.replace("_", "-")
                print(f"fastntk search: note: {flag} is an option of --algo {algo}; "
                      f"--algo {args.algo} does not use it", file=sys.stderr)
    if args.algo == "rea" and args.budget is not None and args.population >= args.budget:
        print(f"fastntk search: note: --population {args.population} >= --budget "
              f"{args.budget}: REA samples its whole budget at random and never mutates",
              file=sys.stderr)


def _cmd_search(args) -> int:
    from fastntk.search import ALGORITHMS, Journal, run_search
    from fastntk.spaces.registry import get_space

    if args.algo not in ALGORITHMS:
        raise OptionError(f"unknown search algorithm {args.algo!r}; known: "
                          f"{', '.join(ALGORITHMS)}")
    if args.budget is None and args.time_budget is None:
        raise OptionError("give --budget N (evaluations) and/or --time-budget SECONDS")
    space = get_space(args.space)
    metrics = _expand_metrics(args.metric)
    _algo_options(args)
    if args.algo == "rea" and args.sample_size > args.population:
        raise OptionError(f"--sample-size ({args.sample_size}) must be <= --population "
                          f"({args.population})")
    journal = Journal(args.db) if args.db is not None else None
    scorer = _scorer(space, metrics, args)
    kw: dict[str, Any] = {}
    if args.algo == "rea":
        kw = {"population_size": args.population, "sample_size": args.sample_size}
    elif args.algo == "reinforce":
        kw = {"lr": args.lr}
    elif args.algo == "prune":
        kw = {"samples_per_op": args.samples_per_op}
    try:
        res = run_search(args.algo, space, scorer, budget=args.budget,
                         time_budget=args.time_budget, seed=args.seed, journal=journal,
                         progress=not args.no_progress, **kw)
    finally:
        if journal is not None:
            journal.close()
    print(f"search {args.algo} on {space.name}: {res.n_evaluations} evaluations "
          f"({res.n_computed} computed, {res.n_cached} from the journal/cache) in "
          f"{res.elapsed:.1f} s, stopped: {res.stop_reason}")
    if res.best is None:
        print("no architecture evaluated")
        return 0
    print(f"best {res.best.encoding}")
    if res.extra.get("note"):  # prune stopped inside a round (the budget)
        print(f"  pruning unfinished: {res.extra['note']}")
    print("  " + "  ".join(f"{m}={_fmt(v)}" for m, v in res.best.metrics.items()))
    if space.name == "nb201":
        print("\n".join(_nb201_truth(res.best.encoding)))
    if args.db is not None:
        print(f"journal {args.db}")
    return 0


def _cmd_evaluate(args) -> int:
    import numpy as np
    from scipy import stats

    from fastntk.metrics import DIRECTIONS
    from fastntk.search import Journal, random_search
    from fastntk.spaces.registry import get_space

    space = get_space(args.space)
    if space.name != "nb201":
        raise OptionError(f"evaluate needs ground-truth accuracies, which only the nb201 space "
                          f"has (got {space.name!r})")
    from fastntk.spaces import nb201

    nb201.accuracy(BENCH_NB201_ARCH, args.dataset)  # OptionError on an unknown data set
    if args.plot:  # before the evaluations, not after them
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise OptionError(f"cannot write --plot {args.plot!r}: {folder} is not a writable "
                              "folder")  # fmt: skip
    metrics = _expand_metrics(args.metric)
    journal = Journal(args.db) if args.db is not None else None
    scorer = _scorer(space, metrics, args)
    try:
        res = random_search(space, scorer, budget=args.archs, seed=args.seed, journal=journal,
                            progress=True)
    finally:
        if journal is not None:
            journal.close()
    archs = res.encodings
    acc = np.array([nb201.accuracy(a, args.dataset) for a in archs])
    rows = []
    cols: list[tuple[str, list[float]]] = []
    for m in metrics:
        sign = 1.0 if DIRECTIONS[m] else -1.0
        vals = []
        for e in res.history:
            v = e.metrics[m]
            vals.append(-math.inf if math.isnan(v) else sign * v)
        cols.append((m, vals))
    if len(metrics) > 1:
        cols.append(("borda", scorer.fitness([e.metrics for e in res.history])))
    print(f"{len(archs)} NB201 archs, ground truth {args.dataset}; metrics oriented so that "
          "higher predicts better (lower-is-better metrics negated; undefined values rank "
          "last)")
    print(f"  {'metric':<16} {'kendall_tau':>11} {'spearman_rho':>12}")
    for name, vals in cols:
        r = stats.rankdata(np.asarray(vals, dtype=float))
        if len(archs) < 2 or np.all(r == r[0]):
            tau = rho = float("nan")
        else:
            tau = float(stats.kendalltau(r, acc).statistic)
            rho = float(stats.spearmanr(r, acc).statistic)
        rows.append((name, tau, rho))
        print(f"  {name:<16} {tau:>11.4f} {rho:>12.4f}")
    if args.plot:
        name, vals = cols[-1]
        if name != "borda" and not DIRECTIONS[name]:
            name = f"-{name}"  # the plotted values are negated (oriented)
        xs = np.asarray(vals, dtype=float)
        _scatter_png(args.plot, xs, acc, xlabel=name, ylabel=f"{args.dataset} accuracy (%)")
        fin = xs[np.isfinite(xs)]
        xr = f"{fin.min():.4g}..{fin.max():.4g}" if fin.size else "-"
        print(f"plot {args.plot} (x: {name} {xr}, y: {args.dataset} accuracy "
              f"{acc.min():.2f}..{acc.max():.2f}%)")
    return 0


# ---------------------------------------------------------------------------
# Scatter plot (matplotlib if installed, else a minimal PNG written by hand)
# ---------------------------------------------------------------------------


def _scatter_png(path: str, x, y, *, xlabel: str = "", ylabel: str = "") -> None:
    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(x, y, s=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    except ImportError:
        pass
    _write_png_scatter(path, x, y)


def _write_png_scatter(path: str, x, y, width: int = 480, height: int = 360) -> None:
    """Scatter of (x, y) as an RGB PNG with axes (no text), using only zlib and struct."""
    import struct

    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    m = 40  # margin
    img[height - m, m:width - m + 1] = 0  # x axis
    img[m:height - m + 1, m] = 0  # y axis
    for t in range(5):  # ticks
        cx = m + t * (width - 2 * m) // 4
        cy = height - m - t * (height - 2 * m) // 4
        img[height - m:height - m + 5, cx] = 0
        img[cy, m - 5:m] = 0

    def scale(v, lo, hi, n):
        if hi <= lo:
            return np.full(v.shape, n // 2)
        return ((v - lo) / (hi - lo) * (n - 1)).round().astype(int)

    if len(x):
        px = m + scale(x, x.min(), x.max(), width - 2 * m)
        py = height - m - scale(y, y.min(), y.max(), height - 2 * m)
        for a, b in zip(px, py, strict=True):
            img[max(b - 2, 0):b + 3, max(a - 2, 0):a + 3] = (31, 119, 180)
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

_COMMANDS = {"score": _cmd_score, "search": _cmd_search, "evaluate": _cmd_evaluate}


def tune_own_process() -> dict | None:
    """With ``FASTNTK_TUNE_ALLOCATOR=1``, let glibc keep freed memory for reuse in the
    command line's own process (:func:`fastntk.tune_allocator`). Off by default: it
    speeds up "trace" kernels at large N but slows the "sum" kernels of NAS scoring
    (README, "Benchmarks")."""
    if os.environ.get("FASTNTK_TUNE_ALLOCATOR", "0").strip() not in ("1", "true", "yes", "on"):
        return None
    from fastntk import tune_allocator

    return tune_allocator()


def entry() -> int:
    """The ``fastntk`` console script (:func:`main`, after :func:`tune_own_process`)."""
    try:
        tune_own_process()
        return main()
    except KeyboardInterrupt:  # before main's own guard (set-up, argument parsing)
        cmd = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        print(f"\nfastntk{' ' + cmd if cmd else ''}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo has its own options (python -m fastntk demo --help)
        from fastntk.cli.demo import main as demo_main

        return _guarded("demo", lambda: demo_main(argv[1:]))
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return _guarded(args.command, lambda: _COMMANDS[args.command](args))


def _guarded(command: str, run) -> int:
    """``run()``'s exit status; user errors as one line on stderr (status 2), Ctrl-C as
    130, a closed pipe (``fastntk ... | head``) quietly."""
    try:
        return run()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except FastNTKError as e:
        msg = " ".join(str(e).split())
        print(f"fastntk {command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfastntk {command}: interrupted", file=sys.stderr)  # (after a progress bar)
        return 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # no second error at exit's flush
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
