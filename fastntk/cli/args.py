"""The command line's arguments: the parser of ``score``, ``search`` and ``evaluate``, and
the argument types they and the demo share. A malformed value is one line on stderr and
exit status 2 (:class:`argparse.ArgumentTypeError`'s message, without a traceback)."""

from __future__ import annotations

import argparse
import math

__all__ = ["OneLineParser", "parser", "positive_float", "positive_int", "seed_arg"]


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(what: str):
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


def positive_float(what: str, unit: str = ""):
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
    p.add_argument(
        "--batch-size",
        type=positive_int("--batch-size"),
        default=batch,
        help=f"samples per NTK batch (default {batch})",
    )
    p.add_argument(
        "--data",
        default="cifar10",
        choices=("cifar10", "synthetic"),
        help="bundled CIFAR-10 sample or seeded synthetic images",
    )
    p.add_argument(
        "--bn",
        choices=("eval", "batch", "per_sample"),
        help="BatchNorm semantics of the kernels (default per_sample, the NAS "
        "preset fastntk.metrics.NAS: it measured best on NAS-Bench-201)",
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of data, init and search")
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="dtype of the kernels (default float32; with --bn eval, float64 "
        "for ncn, cond and vintk, whose condition numbers float32 cannot "
        "resolve beyond 1/(N*eps))",
    )
    p.add_argument(
        "--lga-epochs",
        type=_nonneg_int("--lga-epochs"),
        default=1,
        help="lga_t: epochs of the LGA paper's training before the kernel (default 1)",
    )
    p.add_argument(
        "--lga-train",
        type=positive_int("--lga-train"),
        default=512,
        help="lga_t: training images, the next ones of the data after the "
        "scored batch (default 512)",
    )
    p.add_argument(
        "--lga-batch",
        type=positive_int("--lga-batch"),
        default=64,
        help="lga_t: training minibatch size (default 64)",
    )
    _add_threads_arg(p)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=positive_int("--threads"),
        help="torch intra-op threads (default: torch's choice; on a shared, "
        "loaded machine 1 avoids OpenMP oversubscription)",
    )


def _add_workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=positive_int("--workers"),
        help="score on W processes of this machine (torch's launcher, torchrun "
        "--standalone; each with 1 thread unless OMP_NUM_THREADS says otherwise); across "
        "machines start the command with torchrun instead (README)",
    )


def _add_progress_args(p: argparse.ArgumentParser) -> None:
    """--progress / --no-progress: ``args.progress`` True, False or None (the default: a
    bar where stderr is a terminal), as the search's ``progress`` takes it."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        action="store_const",
        const=True,
        help="a progress bar on stderr even where it is not a terminal (a log)",
    )
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        help="no progress bar (default: one where stderr is a terminal)",
    )


_METRIC_HELP = (
    "metric name(s), comma separated; several are combined by a Borda count "
    "(default: lga,feature_entropy,block_trainability,num_params, the NAS default score; "
    "nas_rank: lga,feature_entropy,block_trainability,num_params, ranks the whole space "
    "best, today the default)"
)


def parser() -> argparse.ArgumentParser:
    """The parser of ``fastntk score | search | evaluate`` (``demo`` is listed only)."""
    top = OneLineParser(prog="fastntk", description="Empirical NTKs and training-free NAS.")
    sub = top.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    # listed for --help; `fastntk demo ...` goes to fastntk.cli.demo before this parser (main)
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
    p.add_argument(
        "--algo",
        default="rea",
        help="rea (default: regularised evolution) | random | prune | reinforce",
    )
    p.add_argument("--metric", help=_METRIC_HELP)
    p.add_argument(
        "--budget", type=positive_int("--budget"), help="number of architecture evaluations"
    )
    p.add_argument(
        "--time-budget",
        type=positive_float("--time-budget", " seconds"),
        help="wall-clock seconds",
    )
    p.add_argument("--db", type=_db_path, help="SQLite journal: resumable search and result store")
    p.add_argument(
        "--population",
        type=positive_int("--population"),
        help="REA population size (default 20, or budget/5 if smaller, at least 2 and at least "
        "--sample-size)",
    )
    p.add_argument(
        "--sample-size",
        type=positive_int("--sample-size"),
        help="REA tournament size (default 5, at most the population)",
    )
    p.add_argument(
        "--lr", type=positive_float("--lr"), help="REINFORCE learning rate (default 0.2)"
    )
    p.add_argument(
        "--samples-per-op",
        type=positive_int("--samples-per-op"),
        help="pruning of spaces without supernets (darts, resnet, vit): "
        "architectures scored per (decision, op) (default 1); nb201 is "
        "pruned on supernets, where it must stay 1",
    )
    _add_progress_args(p)
    _add_workers_arg(p)
    _add_data_args(p, 64)

    p = sub.add_parser("evaluate", help="rank correlation of metrics with true accuracy")
    p.add_argument("--space", default="nb201")
    p.add_argument("--metric", help=_METRIC_HELP)
    p.add_argument(
        "--archs",
        type=positive_int("--archs"),
        required=True,
        help="number of sampled architectures",
    )
    p.add_argument(
        "--dataset", default="cifar10", help="ground truth: cifar10 | cifar100 | imagenet16-120"
    )
    p.add_argument(
        "--plot",
        help="scatter plot PNG of the metric (or Borda count) vs "
        "accuracy; needs matplotlib (pip install fastntk[plot])",
    )
    p.add_argument("--db", type=_db_path, help="SQLite journal to reuse/store the scores")
    _add_progress_args(p)
    _add_workers_arg(p)
    _add_data_args(p, 64)
    return top
