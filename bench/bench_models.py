"""Time and memory of ``fastntk.ntk``'s methods on whole models, one fresh process each.

Models: ``nb201`` (``fastntk.spaces.nb201.BENCH_ARCH``, as in ``bench/bench_engine.py``), ``resnet18``
and ``vit`` (ViT-Small, patch 4 on 32x32), on seeded synthetic CIFAR-sized images. Each
(batch size, method) is measured in a fresh interpreter, so the peak memory is its own:
one warm-up call on the measured batch (``first_s``), ``--repeat`` timed calls (median
``time_s``), then one call under :func:`fastntk.profile` for the Gram step's TFLOP/s.
Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a
CPU (the ``memory`` column says which).

Rows go to ``--csv`` as they are measured: a run stopped by a time limit (``timeout(1)``'s
SIGTERM, as ``bench/gpu_suite.sh`` runs it) keeps what it measured, stops the measuring
child and prints the table so far (exit status 130).

Usage:
    python bench/bench_models.py --model nb201 --n 32,64 --method auto,vmap --csv bench.csv
    python bench/bench_models.py --model vit --n 16 --method auto,layerwise,vmap --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from fastntk.cli.args import OneLineParser, positive_float, positive_int
from fastntk.errors import FastNTKError, OptionError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _child  # noqa: E402

HEADER = ("model", "method", "n", "output", "time_s", "samples_per_s", "gram_tflops",
          "peak_mib", "memory", "device", "first_s", "stack", "error")  # fmt: skip


def _sizes(s: str) -> list[int]:
    return [positive_int("--n")(p.strip()) for p in s.split(",")]


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bench_models.py", description="Time and memory of the NTK methods.")
    p.add_argument("--model", default="nb201", choices=("nb201", "resnet18", "vit"))
    p.add_argument("--n", type=_sizes, default=[32], help="batch size(s), e.g. 32,64")
    p.add_argument("--method", default="auto", help="fastntk.ntk method(s), comma separated")
    p.add_argument("--output", default="sum", choices=("sum", "trace"))
    p.add_argument(
        "--repeat",
        type=positive_int("--repeat"),
        default=1,
        help="timed calls per measurement (median reported; default 1)",
    )
    p.add_argument("--csv", help="also write the table as CSV")
    p.add_argument(
        "--timeout",
        type=positive_float("--timeout"),
        default=600.0,
        help="seconds per measurement (default 600)",
    )
    p.add_argument(
        "--threads",
        type=positive_int("--threads"),
        help="torch intra-op threads (default: torch's choice; on a shared, "
        "loaded machine 1 avoids OpenMP oversubscription)",
    )
    return p


def bench_model(name: str):
    """The ``nn.Module`` of ``--model name`` (seeded by the caller)."""
    if name == "nb201":
        from fastntk.spaces.nb201 import BENCH_ARCH, build_model

        return build_model(BENCH_ARCH)
    if name == "resnet18":
        from fastntk.spaces.resnet import resnet18

        return resnet18()
    if name == "vit":
        from fastntk.spaces.vit import vit_small

        return vit_small()
    raise OptionError(f"unknown bench model {name!r}; choose nb201, resnet18 or vit")


def child(spec_json: str) -> None:
    """Run in a fresh process: one measurement, reported as ``_child`` reads it."""
    import resource
    import statistics

    import torch

    from fastntk.data import synthetic
    from fastntk.engine import ntk
    from fastntk.profiling import profile

    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = bench_model(spec["model"]).to(device)
    x, _ = synthetic(spec["n"], seed=0)
    x = x.to(device)
    kw = {"output": spec["output"], "method": spec["method"]}
    out: dict[str, Any] = {}
    try:
        # warm-up on the measured batch itself: a smaller one leaves the first timed call
        # to compile the Triton kernels for the batch's shapes (they specialise on sizes
        # divisible by 16) and to choose cuDNN/cuBLAS algorithms for its shapes
        t = time.perf_counter()
        ntk(model, x, **kw)
        if cuda:
            torch.cuda.synchronize()
        out["first_s"] = time.perf_counter() - t
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(spec["repeat"]):
            t = time.perf_counter()
            K = ntk(model, x, **kw)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            del K
        out["time_s"] = statistics.median(times)
        with profile() as prof:  # one more call: the Gram step's share and TFLOP/s
            ntk(model, x, **kw)
        out["gram_s"] = prof.seconds.get("gram", 0.0)
        out["gram_tflops"] = prof.gram_tflops
        if cuda:
            out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out["memory"] = "cuda_max_allocated"
        else:
            out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
            out["memory"] = "process_peak_rss"
        out["device"] = torch.cuda.get_device_name() if cuda else "cpu"
        out["stack"] = f"torch {torch.__version__}" + (
            f" CUDA {torch.version.cuda} TF32-conv {'on' if torch.backends.cudnn.allow_tf32 else 'off'}"
            if cuda else "")  # fmt: skip
    except Exception as e:  # reported as a row, not a crash of the table
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]
    _child.report(out)


def run(args: argparse.Namespace) -> int:
    """Measure every (n, method) of ``args``; the table on stdout, progress on stderr."""
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise OptionError("--method needs at least one method")
    import torch

    from fastntk.engine import METHODS

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise OptionError(f"unknown NTK method {bad[0]!r}; known: {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    params = sum(p.numel() for p in bench_model(args.model).parameters())
    print(
        f"bench {args.model} ({params / 1e6:.2f}M parameters), output {args.output}, "
        f"{args.threads or torch.get_num_threads()} threads; one fresh process per "
        "measurement",
        file=sys.stderr,
    )
    csv_file = writer = None
    if args.csv:  # written row by row: a run stopped by a time limit keeps what it measured
        try:
            csv_file = open(args.csv, "w", newline="")  # noqa: SIM115 - closed below
        except OSError as e:
            raise OptionError(f"cannot write --csv {args.csv!r}: {e.strerror}") from None
        writer = csv.writer(csv_file)
        writer.writerow(HEADER)
        csv_file.flush()

    def emit(row: dict[str, Any]) -> None:
        if writer is not None:
            writer.writerow([row.get(h, "") for h in HEADER])
            csv_file.flush()

    def stop(signum, frame):  # timeout(1)'s SIGTERM: kill the measuring child, keep the rows
        raise KeyboardInterrupt(f"signal {signum}")

    rows: list[dict[str, Any]] = []
    old_term = signal.signal(signal.SIGTERM, stop)
    try:
        _measure_all(args, methods, rows, emit)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if csv_file is not None:
            csv_file.close()
        _print_table(rows)
        if args.csv:
            print(f"csv {args.csv}")
    return 0


def _measure_all(args, methods: list[str], rows: list[dict[str, Any]], emit) -> None:
    """One fresh process per (n, method); each row handed to ``emit`` as it is measured."""
    for n in args.n:
        for method in methods:
            spec = {"model": args.model, "n": n, "method": method, "output": args.output,
                    "repeat": args.repeat, "threads": args.threads}  # fmt: skip
            row: dict[str, Any] = {"model": args.model, "method": method, "n": n,
                                   "output": args.output}  # fmt: skip
            row.update(_child.run(__file__, spec, timeout=args.timeout))
            if "time_s" in row:
                row["samples_per_s"] = n / row["time_s"] if row["time_s"] > 0 else math.inf
            rows.append(row)
            emit(row)
            print(
                f"  n={n} {method}: "
                + (f"{row['time_s']:.3f} s" if "time_s" in row else row.get("error", "?")),
                file=sys.stderr,
            )


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    table = []
    for r in rows:
        table.append([
            str(r["model"]), str(r["method"]), str(r["n"]), str(r["output"]),
            f"{r['time_s']:.4f}" if "time_s" in r else "-",
            f"{r['samples_per_s']:.1f}" if "samples_per_s" in r else "-",
            f"{r['gram_tflops']:.4f}" if r.get("gram_tflops") else "-",
            f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-", str(r.get("memory", "-")),
            str(r.get("device", "-")),
            f"{r['first_s']:.3f}" if "first_s" in r else "-", str(r.get("stack", "-")),
            str(r.get("error", "")),
        ])  # fmt: skip
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(HEADER)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)).rstrip())
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    """The script's exit status: 0 ok, 2 a usage or input error (one line on stderr),
    130 interrupted (Ctrl-C, SIGTERM) after printing the rows measured so far."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "bench_models.py"
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return run(args)
    except FastNTKError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # one measurement, started by _measure_all
        child(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
