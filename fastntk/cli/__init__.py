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

The package: :mod:`~fastntk.cli.args` (the parser and argument types),
:mod:`~fastntk.cli.commands` (score, search, evaluate), :mod:`~fastntk.cli.plot`
(evaluate's scatter plot), :mod:`~fastntk.cli.demo` (``fastntk demo``, its own options);
this module dispatches and turns errors into exit statuses.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from fastntk.cli.args import parser
from fastntk.cli.commands import COMMANDS
from fastntk.errors import FastNTKError

__all__ = ["entry", "main"]


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
        args = parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "workers", None) and args.workers > 1:
        from fastntk.search import workers

        if not workers.ranked():  # start the same command on W ranks (torchrun)
            return workers.launch(_without_workers(argv), args.workers)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return _guarded(args.command, lambda: COMMANDS[args.command](args))


def _without_workers(argv: list[str]) -> list[str]:
    """``argv`` less its ``--workers W`` (or ``--workers=W``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            out.append(a)
    return out


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
