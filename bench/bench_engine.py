"""Engine benchmark: fastntk's paths vs torch.func vmap(jacrev) vs the per-sample loop.

One workload (NAS-Bench-201 network, float32, eval BatchNorm, CIFAR-10 images
from the bundled sample), several providers, each measured in a fresh
subprocess so that its peak resident memory is its own:

* ``floor``: one plain forward+backward of the batch per output dimension
  (1 for "sum", K for "trace") plus the Gram of the (N, K·P) Jacobian (one (N, P)
  matmul for "sum", K accumulated (N, P) matmuls for "trace": the trace kernel is
  the Gram of every sample's K·P derivatives): the least any exact method can do.
* ``fwdbwd``: one plain forward+backward (the memory reference).
* ``layerwise``: ``fastntk.ntk(method="layerwise")``.
* ``vmap``: torch.func ``vmap(jacrev)`` (``fastntk.ntk(method="vmap")``: holds the Jacobian).
* ``loop``: per-sample backward through the batch graph (TE-NAS style); at
  large N timed on the first ``--loop-rows`` rows and extrapolated linearly
  (every row costs one backward of the same graph), which the table marks.

Times are medians of ``--repeats`` warm calls (after one warm-up call in the
same process); peak memory is the subprocess's peak RSS. Ratios are taken
within one run. Results are appended to ``bench/results/engine_<device>.csv``
and printed as a markdown table.

Usage:
    python bench/bench_engine.py --n 128 --output sum
    python bench/bench_engine.py --n 32 --output trace --providers floor,layerwise,vmap
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _meta import git_sha, gpu_stack  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _workload(n: int, device: str):
    import torch

    import fastntk.data as data
    from fastntk.spaces.nb201 import BENCH_ARCH, build_model

    torch.manual_seed(0)
    model = build_model(BENCH_ARCH, num_classes=10).to(device)
    if n <= data.cifar10_size():
        x, _ = data.load_cifar10(n, seed=0)
    else:
        x, _ = data.synthetic(n, seed=0)
    return model, x.to(device)


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    provider: str, n: int, output: str, repeats: int, device: str, loop_rows: int, tune: bool
) -> dict:
    """Runs in the child process."""
    import torch

    import fastntk

    torch.set_grad_enabled(True)
    if tune:
        assert fastntk.tune_allocator()["applied"], "tune_allocator() had no effect here"
    model, x = _workload(n, device)
    info: dict = {}

    if provider in ("floor", "fwdbwd"):
        params = [p for p in model.parameters() if p.requires_grad]
        P = sum(p.numel() for p in params)
        model.eval()
        # the floor's Gram operand, made outside the timed region
        G = torch.randn(n, P, device=x.device) if provider == "floor" else None

        def run():
            out = model(x)[1]
            k = out.shape[1] if output == "trace" and provider == "floor" else 1
            # one-hot weights made on the device (as fastntk's Head.passes does): a
            # torch.tensor([j], device=cuda) per pass is a blocking host-to-device copy
            eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device) if k > 1 else None
            for j in range(k):
                w = torch.ones_like(out) if k == 1 else eye[j].expand_as(out).contiguous()
                torch.autograd.grad(out, params, grad_outputs=w, retain_graph=j < k - 1)
            if provider == "floor":
                # the Gram's own time: on CUDA from events in the stream (the backward's
                # kernels may still run when the host gets here, so a host timer would count
                # them); on the CPU the calls are synchronous
                cuda = device.startswith("cuda")
                if cuda:
                    e0, e1 = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    e0.record()
                t0 = time.perf_counter()
                theta = G @ G.T  # the Gram of an (N, P) matrix, once per output dimension
                for _ in range(k - 1):
                    theta.addmm_(G, G.T)
                if cuda:
                    e1.record()
                    e1.synchronize()
                    gram_s = e0.elapsed_time(e1) / 1e3
                else:
                    gram_s = time.perf_counter() - t0
                info.setdefault("gram_s", []).append(gram_s)
                info["gram_flop"] = 2.0 * n * n * P * k

    elif provider == "loop":
        from fastntk._model import Head, make_copies, select_params

        sel = select_params(model, None)
        model.eval()
        rows = min(n, loop_rows) if loop_rows > 0 else n
        info["rows_timed"] = rows

        def run():
            copies = make_copies(model, sel, torch.float32)
            head = Head(output)
            y = head(copies.call(model, x))
            passes = head.passes(y)
            tensors = [copies.params[name] for name in sel]
            J = []
            for i in range(rows):
                for w in passes:
                    E = torch.zeros_like(y)
                    E[i] = w[i]
                    gs = torch.autograd.grad(y, tensors, grad_outputs=E, retain_graph=True)
                    J.append(torch.cat([g.reshape(-1) for g in gs]))
            Jm = torch.stack(J)
            _ = Jm @ Jm.T

    else:

        def run():
            fastntk.ntk(model, x, output=output, method=provider)

    t0 = time.perf_counter()
    run()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    if provider == "loop" and info["rows_timed"] < n:
        med = med * n / info["rows_timed"]  # extrapolated: one backward per row
        first = first * n / info["rows_timed"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reserved = None
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()  # what the process holds (fragmentation)
    res = {
        "provider": provider,
        "n": n,
        "output": output,
        "times_s": [t * n / info["rows_timed"] for t in times]
        if provider == "loop" and info["rows_timed"] < n
        else times,
        "median_s": med,
        "spread_s": (max(times) - min(times)) if len(times) > 1 else 0.0,
        "first_s": first,
        "peak_bytes": peak,
        "peak_reserved_bytes": reserved,
        "extrapolated": provider == "loop" and info.get("rows_timed", n) < n,
    }
    if "gram_s" in info:
        res["gram_s"] = statistics.median(info["gram_s"][1:] or info["gram_s"])
        res["gram_tflops"] = info["gram_flop"] / res["gram_s"] / 1e12
    if provider not in ("floor", "fwdbwd", "loop"):
        # one more call under fastntk.profile(): the phase split and the Gram's TFLOP/s
        with fastntk.profile() as prof:
            run()
        res["gram_s"] = prof.seconds.get("gram", 0.0)
        res["gram_tflops"] = prof.gram_tflops
        res["phases"] = " ".join(
            f"{k}={v:.3f}" for k, v in prof.as_dict().items() if k.endswith("_s") and v > 0
        )
    return res


def machine() -> dict:
    import torch

    dev = "cpu"
    name = platform.processor() or platform.machine()
    extra = ""
    if torch.cuda.is_available():
        dev = "cuda"
        name = torch.cuda.get_device_name()
        extra = gpu_stack()
    return {
        "device": dev,
        "device_name": name,
        "stack": extra,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": git_sha(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", default="128", help="batch sizes, comma-separated")
    ap.add_argument("--output", default="sum", choices=["sum", "trace"])
    ap.add_argument("--providers", default="fwdbwd,floor,layerwise,vmap,loop")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of all providers, each in fresh processes, interleaved so that a drift "
        "of the machine's speed hits every provider alike; times are medians over all calls",
    )
    ap.add_argument("--loop-rows", type=int, default=16, help="rows timed for the loop (0 = all)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument(
        "--tune-allocator",
        action="store_true",
        help="every provider's process calls fastntk.tune_allocator() first (glibc keeps "
        "freed memory; the floor and vmap benefit as much as fastntk)",
    )
    ap.add_argument(
        "--csv", help="append the rows here (default bench/results/engine_<device>.csv)"
    )
    ap.add_argument(
        "--child-timeout",
        type=float,
        default=0,
        help="seconds one provider's process may take (0: no limit); one that runs longer "
        "becomes a failed row and the run goes on with the next provider",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        prov, n = args.child.split(":")
        res = measure(
            prov,
            int(n),
            args.output,
            args.repeats,
            args.device,
            args.loop_rows,
            args.tune_allocator,
        )
        print("RESULT " + json.dumps(res))
        return 0

    info = machine()
    rows = []

    def _term(signum, frame):  # timeout(1) of the suite's step: report what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)
    cut = None
    try:
        for n in [int(v) for v in args.n.split(",")]:
            rounds: dict[str, list[dict]] = {}
            try:
                for r in range(args.rounds):
                    for prov in args.providers.split(","):
                        res = _child(prov, n, args, r)
                        rounds.setdefault(prov, []).append(res)
            finally:
                rows += [_merge(results) for results in rounds.values()]
                missing = [p for p in args.providers.split(",") if p not in rounds]
    except KeyboardInterrupt as e:
        cut = str(e) or "interrupted"
        sys.stderr.write(f"  stopped ({cut}): the table below has what was measured\n")
        rows += [{"provider": p, "n": n, "output": args.output,
                  "error": f"not measured: the run was stopped ({cut})"} for p in missing]  # fmt: skip
    _report(rows, info, args)
    return 1 if cut else 0


def _child(prov: str, n: int, args, r: int) -> dict:
    """One provider measured in a fresh process."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        f"{prov}:{n}",
        "--output",
        args.output,
        "--repeats",
        str(args.repeats),
        "--loop-rows",
        str(args.loop_rows),
        "--device",
        args.device,
    ] + (["--tune-allocator"] if args.tune_allocator else [])
    sys.stderr.write(
        f"  measuring {prov} at N={n} ({args.output}), round {r + 1}/{args.rounds} ...\n"
    )
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout or None)
    except subprocess.TimeoutExpired:
        sys.stderr.write(f"    {prov}: timed out after {args.child_timeout:g} s\n")
        return {"provider": prov, "n": n, "output": args.output,
                "error": f"timed out after {args.child_timeout:g} s"}  # fmt: skip
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        err = (p.stderr.strip().splitlines() or ["?"])[-1]
        sys.stderr.write(f"    {prov}: failed: {err}\n")
        return {"provider": prov, "n": n, "output": args.output, "error": err[:120]}
    res = json.loads(line[0][7:])
    sys.stderr.write(  # as it comes: a run cut short still shows what it measured
        f"    {prov}: median {res['median_s']:.4f} s, first call {res['first_s']:.3f} s, "
        f"peak {res['peak_bytes'] / 1e9:.2f} GB\n"
    )
    return res


def _merge(results: list[dict]) -> dict:
    """Rounds of one provider: the median over all their timed calls, the largest peak."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    res = dict(ok[-1])
    times = [t for r in ok for t in r["times_s"]]
    res["median_s"] = statistics.median(times)
    res["spread_s"] = max(times) - min(times) if len(times) > 1 else 0.0
    res["first_s"] = statistics.median(r["first_s"] for r in ok)
    res["peak_bytes"] = max(r["peak_bytes"] for r in ok)
    res["rounds"] = len(ok)
    if "gram_s" in ok[0]:
        res["gram_s"] = statistics.median(r["gram_s"] for r in ok)
        res["gram_tflops"] = statistics.median(r["gram_tflops"] for r in ok)
    return res


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _report(rows, info, args):
    by = {(r["provider"], r["n"]): r for r in rows}
    hdr = (
        "| N | output | provider | median s | samples/s | first-call s | peak mem GB | x floor | "
        "layerwise speed-up | vmap / this | mem / fwd+bwd | Gram TFLOP/s |"
    )
    lines = [
        f"Machine: {info['device_name']} ({info['device']}, {info['cpus']} CPUs), torch {info['torch']}, "
        f"git {info['git']}, {info['date']}." + (f" {info['stack']}." if info.get("stack") else ""),
        f"Command: `python bench/bench_engine.py --n {args.n} --output {args.output} "
        f"--providers {args.providers} --repeats {args.repeats} --rounds {args.rounds}"
        + (" --tune-allocator" if args.tune_allocator else "")
        + "`",
        "",
        hdr,
        "|" + "---|" * 12,
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['n']} | {r['output']} | {r['provider']} | failed: {r['error']} "
                "| | | | | | | | |"
            )
            continue
        floor = by.get(("floor", r["n"]))
        fb = by.get(("fwdbwd", r["n"]))
        lw = by.get(("layerwise", r["n"]))
        vm = by.get(("vmap", r["n"]))
        xf = f"{r['median_s'] / floor['median_s']:.2f}" if floor and "median_s" in floor else ""
        sp = f"{r['median_s'] / lw['median_s']:.1f}x" if lw and "median_s" in lw else ""
        vs = f"{vm['median_s'] / r['median_s']:.2f}x" if vm and "median_s" in vm else ""
        mem = f"{r['peak_bytes'] / fb['peak_bytes']:.2f}" if fb and "peak_bytes" in fb else ""
        name = r["provider"] + (" (extrapolated)" if r.get("extrapolated") else "")
        if r["provider"] == "floor" and "gram_s" in r:
            name += f" (Gram {r['gram_s']:.4f} s)"
        tf = f"{r['gram_tflops']:.3f}" if r.get("gram_tflops") else ""
        lines.append(
            f"| {r['n']} | {r['output']} | {name} | {r['median_s']:.3f} | "
            f"{r['n'] / r['median_s']:.1f} | {r['first_s']:.3f} | "
            f"{r['peak_bytes'] / 1e9:.2f} | {xf} | {sp} | {vs} | {mem} | {tf} |"
        )
    lines += ["", "Times: medians of the warm calls (the first call of each fresh process is "
              "the first-call column). Peak memory: "
              + ("torch.cuda.max_memory_allocated over the process (model, inputs and the "
                 "floor's (N, P) operand included); reserved by the caching allocator: "
                 + ", ".join(f"{r['provider']} {r['peak_reserved_bytes'] / 1e9:.2f} GB"
                             for r in rows if r.get("peak_reserved_bytes"))
                 if info["device"] == "cuda" else "peak RSS of the process")
              + ". Gram TFLOP/s: 2·n_A·n_B·cols per product (GEMM convention; the symmetric "
              "Triton kernel executes about half of it), fastntk's from one more call under "
              "fastntk.profile()."]  # fmt: skip
    phases = [f"* {r['provider']}: {r['phases']}" for r in rows if r.get("phases")]
    if phases:
        lines += ["", "Phase split of one more call under `fastntk.profile()` (seconds):", *phases]
    text = "\n".join(lines)
    print(text)
    path = args.csv or os.path.join(HERE, "results", f"engine_{info['device']}.csv")
    append_csv(path, info, rows)


# The CSV's columns. A file written before a column was added is rewritten once with the
# new header (its old rows get empty cells there), so every row of a file has one layout.
CSV_FIELDS = ["date", "git", "device_name", "torch", "stack", "n", "output", "provider",
              "median_s", "spread_s", "first_s", "peak_bytes", "peak_reserved_bytes",
              "extrapolated", "error", "gram_s", "gram_tflops", "phases"]  # fmt: skip


def append_csv(path: str, info: dict, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    old: list[dict] | None = []  # rows to write again under the new header; None: append
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            if fields == CSV_FIELDS:
                old = None
            else:
                unknown = set(fields) - set(CSV_FIELDS)
                if unknown:
                    raise SystemExit(
                        f"{path}: columns {sorted(unknown)} are not this script's; "
                        "pass another --csv"
                    )
                old = list(reader)
    with open(path, "a" if old is None else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
        if old is not None:
            w.writeheader()
            w.writerows(old)
        for r in rows:
            w.writerow({**{k: info.get(k, "") for k in ("date", "git", "device_name", "torch", "stack")},
                        **{k: r.get(k, "") for k in CSV_FIELDS[5:]}})  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
