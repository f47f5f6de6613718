"""One process against ranks of ``torch.distributed``: one kernel, and ``evaluate``.

Two measurements, each as one process with ``--threads`` threads and as ``--ranks``
ranks (gloo, this machine, started as torchrun starts them) with ``threads / ranks``
threads each, so both use the same cores:

* ``kernel``: ``fastntk.ntk`` of the NB201 benchmark network (``nb201.BENCH_ARCH``) on
  ``--n`` bundled CIFAR-10 images, ``output="sum"``, float32, against
  ``fastntk.distributed.ntk`` (tiles of ``--tile`` samples);
* ``evaluate``: ``fastntk evaluate --archs A`` (the NAS defaults, 64 images) against the
  same with its ranks (``--workers``'s path).

Reported: wall time, speed-up, parallel efficiency (speed-up / ranks) and the peak RSS of
each process (rank).

    python bench/bench_distributed.py --out bench/results/distributed_cpu.md   # ~10 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _child  # noqa: E402
from _meta import git_sha  # noqa: E402


def kernel_child(n: int, tile: int, distributed: bool) -> dict:
    import torch

    import fastntk
    import fastntk.distributed as fd
    from fastntk.data import load
    from fastntk.spaces.nb201 import BENCH_ARCH, build_model

    torch.manual_seed(0)
    model = build_model(BENCH_ARCH)
    x, _ = load("cifar10", n, seed=0)
    t = time.perf_counter()
    if distributed:
        fd.ntk(model, x, tile=tile, progress=False)
    else:
        fastntk.ntk(model, x, progress=False)
    return {"time_s": time.perf_counter() - t}


def _ranks(cmd: list[str], ranks: int, threads: int) -> list[dict]:
    from fastntk.distributed import spawn_local

    return [_result(p) for p in spawn_local(cmd, ranks, threads=threads)]


def _one(cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _result(p)


def _result(p: subprocess.Popen) -> dict:
    out, err = p.communicate()
    res = _child.parse(out)
    if p.returncode != 0 or res is None:
        raise SystemExit(f"a measurement failed ({p.returncode}): {err.strip()[-500:]}")
    return res


def timed_cli(argv: list[str]) -> dict:
    """``fastntk argv`` in this process: its wall time and peak RSS."""
    from fastntk.cli import main

    t = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise SystemExit(rc)
    return {"time_s": time.perf_counter() - t}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="images (the bundled sample has 1,000)")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--archs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        if spec["what"] == "kernel":
            res = kernel_child(spec["n"], spec["tile"], spec["distributed"])
        else:
            res = timed_cli(spec["argv"])
        res["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        _child.report(res)
        return 0
    per_rank = max(1, args.threads // args.ranks)
    me = [sys.executable, os.path.abspath(__file__), "--child"]
    rows = []
    kspec = {"what": "kernel", "n": args.n, "tile": args.tile}
    one = _one([*me, json.dumps({**kspec, "distributed": False})], args.threads)
    many = _ranks([*me, json.dumps({**kspec, "distributed": True})], args.ranks, per_rank)
    rows.append((f"kernel: NB201 BENCH_ARCH, N={args.n}, sum, float32", one, many))
    print(rows[-1], file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ev = ["evaluate", "--archs", str(args.archs), "--no-progress"]
        one = _one([*me, json.dumps({"what": "cli", "argv": [
            *ev, "--db", os.path.join(tmp, "1.db")]})], args.threads)  # fmt: skip
        many = _ranks([*me, json.dumps({"what": "cli", "argv": [
            *ev, "--db", os.path.join(tmp, "2.db")]})], args.ranks, per_rank)  # fmt: skip
    rows.append((f"evaluate --archs {args.archs} (NAS defaults, 64 images)", one, many))
    table = _table(rows, args, per_rank)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


def _table(rows, args, per_rank) -> str:
    import torch

    lines = [
        f"## One process ({args.threads} threads) against {args.ranks} ranks ({per_rank} "
        "thread each), gloo",
        "",
        f"`python bench/bench_distributed.py {' '.join(sys.argv[1:])}`; {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, commit {git_sha()}, "
        f"{time.strftime('%Y-%m-%d')}. Wall time of the call (ranks: the slowest rank's, "
        "including the process group's start); peak: each process's RSS.",
        "",
        "| work | one process | ranks | speed-up | efficiency | peak per process (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for what, one, many in rows:
        t = max(m["time_s"] for m in many)
        peaks = " / ".join(f"{m['peak_mib']:.0f}" for m in many)
        lines.append(
            f"| {what} | {one['time_s']:.2f} s | {t:.2f} s | {one['time_s'] / t:.2f}× | "
            f"{one['time_s'] / t / len(many):.0%} | one: {one['peak_mib']:.0f}; ranks: {peaks} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
