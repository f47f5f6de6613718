"""GPU checks that CI cannot run: every method on CUDA tensors against the float64 oracle,
and the Triton Gram kernel's operand modes (ieee / tf32 / bf16) with their measured error.

Part 1 runs each ``method`` (layerwise, auto, triton, vmap) on the test zoo's models moved
to the device, float32 and float64, against the float64 ``torch.func.jacrev`` oracle of
``tests/reference.py`` computed on the CPU, with the tolerances of the test suite
(relative error 1e-6 in float64, 1e-4 in float32). Part 2 times ``fastntk.kernels.gram``
in each operand mode against ``torch.mm`` and measures its error against a float64 Gram,
at per-sample gradient block shapes. Exit status 1 when any check of part 1 fails.

Usage (on a machine with a CUDA GPU; ``--device cpu`` with ``TRITON_INTERPRET=1`` runs
the same plumbing on small shapes):
    python bench/gpu_check.py --out bench/results/gpu_check.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import fastntk  # noqa: E402
from reference import full_kernel, reduce, rel_err  # noqa: E402
import zoo  # noqa: E402

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
CASES = ["mlp", "convzoo", "resnet", "vit", "tied", "nb201"]


def check_methods(device: str, lines: list[str]) -> bool:
    lines += ["## Methods on the device against the float64 oracle (CPU)", "",
              "| model | method | dtype | output | rel. error | tolerance | ok |",
              "|---|---|---|---|---|---|---|"]
    ok_all = True
    for name in CASES:
        m, x1, x2 = zoo.make(name)
        ref = full_kernel(m, x1, x2)
        md, a, b = m.to(device), x1.to(device), x2.to(device)
        for method in ("layerwise", "auto", "triton", "vmap"):
            for dtype in (torch.float32, torch.float64):
                if method == "triton" and dtype == torch.float64:
                    continue  # the Triton kernels take float32 operands
                for output in ("sum", "trace"):
                    try:
                        th = fastntk.ntk(md, a, b, output=output, method=method, dtype=dtype)
                        err = rel_err(th.cpu(), reduce(ref, output))
                        ok = err <= TOL[dtype]
                        cell = f"{err:.2e}"
                    except Exception as exc:  # reported, counted as a failure
                        ok, cell = False, f"{type(exc).__name__}: {str(exc)[:60]}"
                    ok_all &= ok
                    lines.append(f"| {name} | {method} | {str(dtype)[6:]} | {output} | {cell} "
                                 f"| {TOL[dtype]:.0e} | {'yes' if ok else '**NO**'} |")
        m.cpu()
    return ok_all


def _time(f, device: str, reps: int = 10) -> float:
    f()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            f()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps


def check_gram_modes(device: str, shapes: list[tuple[int, int]], lines: list[str]) -> None:
    from fastntk.kernels.gram import gram

    lines += ["", "## Triton Gram operand modes (symmetric G Gᵀ; accumulation in float32)", "",
              "Data: standard normal plus a common offset of 1 per column (mean-dominated "
              "entries, as per-sample gradients of one layer often are).", "",
              "| N | columns | mode | s | TFLOP/s | rel. Frobenius error | max rel. entry error |",
              "|---|---|---|---|---|---|---|"]
    for n, cols in shapes:
        g = torch.Generator(device="cpu").manual_seed(n + cols)
        a = (torch.randn(n, cols, generator=g) + 1.0).to(device)
        truth = (a.double() @ a.double().T)
        flop = 2.0 * n * n * cols
        runs = [("torch.mm float32", lambda: a @ a.T)]
        runs += [(f"triton {p}", lambda p=p: gram(a, None, precision=p)) for p in ("ieee", "tf32", "bf16")]
        for label, f in runs:
            t = _time(f, device)
            out = f().double()
            fro = ((out - truth).norm() / truth.norm()).item()
            mx = ((out - truth).abs() / truth.abs().clamp_min(1e-30)).max().item()
            lines.append(f"| {n} | {cols} | {label} | {t:.4f} | {flop / t / 1e12:.2f} | "
                         f"{fro:.2e} | {mx:.2e} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="markdown file (default: stdout only)")
    ap.add_argument("--gram-shapes", default="1024x36864,4096x9216,16384x2304",
                    help="NxCOLS,... for part 2 (small ones for a CPU smoke run)")
    args = ap.parse_args()
    env = fastntk.env()
    lines = [f"# GPU checks: device {args.device} ({env.get('device_name')}), torch "
             f"{torch.__version__}, triton {env.get('triton_version')}", ""]
    ok = check_methods(args.device, lines)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.gram_shapes.split(",")]
    try:
        check_gram_modes(args.device, shapes, lines)
    except Exception as exc:  # part 2 is a measurement; report and go on
        lines.append(f"Gram modes failed: {type(exc).__name__}: {exc}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
