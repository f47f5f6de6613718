"""GPU checks that CI cannot run: every method on CUDA tensors against the float64 oracle,
and the Triton Gram kernel's operand modes (ieee / tf32 / bf16) with their measured error.

Part 1 runs each ``method`` (layerwise, auto, triton, vmap) on the test zoo's models moved
to the device, float32 and float64, against the float64 ``torch.func.jacrev`` oracle of
``tests/reference.py`` computed on the CPU, with the tolerances of the test suite
(relative error 1e-6 in float64, 1e-4 in float32). Part 2 times ``fastntk.kernels.gram``
in each operand mode against ``torch.mm`` and measures its error against a float64 Gram,
at per-sample gradient block shapes. Part 3, where ``fastntk._C`` was built with its CUDA
kernels (``bash bench/gpu_suite.sh check`` builds it first), holds ``gram_sym``,
``gram_cross`` and ``conv2d_psg`` on CUDA tensors against float64 references (odd sizes,
strides, padding, dilation, groups), runs the engine with them (backend ``"csrc"``) against
the oracle, and times the Gram against ``torch.mm``. Part 4 times the per-sample conv
weight-gradient paths (PyTorch strategies, Triton, the C++ op) at NB201/ResNet shapes.
Exit status 1 when any check of part 1 or 3 fails.

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

import zoo  # noqa: E402
from _meta import git_sha  # noqa: E402
from reference import full_kernel, reduce, rel_err  # noqa: E402

import fastntk  # noqa: E402

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
CASES = ["mlp", "convzoo", "resnet", "vit", "tied", "nb201"]


def check_methods(device: str, lines: list[str], save=lambda: None) -> bool:
    lines += [
        "## Methods on the device against the float64 oracle (CPU)",
        "",
        "| model | method | dtype | output | rel. error | tolerance | ok |",
        "|---|---|---|---|---|---|---|",
    ]
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
                    lines.append(
                        f"| {name} | {method} | {str(dtype)[6:]} | {output} | {cell} "
                        f"| {TOL[dtype]:.0e} | {'yes' if ok else '**NO**'} |"
                    )
        m.cpu()
        save()  # after every model: a run cut short by its time limit keeps the rows so far
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

    lines += [
        "",
        "## Triton Gram operand modes (symmetric G Gᵀ; accumulation in float32)",
        "",
        "Data: standard normal plus a common offset of 1 per column (mean-dominated "
        "entries, as per-sample gradients of one layer often are).",
        "",
        "TFLOP/s: 2·N²·columns / s for every row (the symmetric Triton kernel executes "
        "about half of it: its figure is an effective rate).",
        "",
        "| N | columns | mode | s | TFLOP/s | rel. Frobenius error | max rel. entry error |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, cols in shapes:
        g = torch.Generator(device="cpu").manual_seed(n + cols)
        a = (torch.randn(n, cols, generator=g) + 1.0).to(device)
        truth = a.double() @ a.double().T
        flop = 2.0 * n * n * cols
        runs = [("torch.mm float32", lambda: a @ a.T)]
        runs += [
            (f"triton {p}", lambda p=p: gram(a, None, precision=p))
            for p in ("ieee", "tf32", "bf16")
        ]
        for label, f in runs:
            t = _time(f, device)
            out = f().double()
            fro = ((out - truth).norm() / truth.norm()).item()
            mx = ((out - truth).abs() / truth.abs().clamp_min(1e-30)).max().item()
            lines.append(
                f"| {n} | {cols} | {label} | {t:.4f} | {flop / t / 1e12:.2f} | "
                f"{fro:.2e} | {mx:.2e} |"
            )


def check_csrc(device: str, shapes: list[tuple[int, int]], lines: list[str]) -> bool:
    """The extension's ops on ``device`` (its CUDA kernels on a GPU) against float64
    references; the engine with them; Gram timing."""
    import torch.nn.functional as F

    from fastntk import _ext

    lines += [
        "",
        f"## C++ extension's kernels on {device} (on a GPU: fastntk._C built with CUDA)",
        "",
    ]
    # On the CPU the same checks run the CPU ops (the smoke run of this script's plumbing).
    reason = _ext.cuda_why_not() if device == "cuda" else _ext.why_not()
    if reason is not None:
        lines.append(f"Not run: {reason}.")
        return False
    lines += ["| op | shape | dtype | rel. error | tolerance | ok |", "|---|---|---|---|---|---|"]
    ok_all = True
    g = torch.Generator(device="cpu").manual_seed(7)

    def row(op: str, shape: str, dtype: str, err: float, tol: float) -> None:
        nonlocal ok_all
        ok = err <= tol  # NaN fails
        ok_all &= ok
        lines.append(
            f"| {op} | {shape} | {dtype} | {err:.2e} | {tol:.0e} | {'yes' if ok else '**NO**'} |"
        )

    for n1, n2, p in [(1, 1, 97), (97, 33, 1023), (130, 64, 4097), (1000, 257, 3000)]:
        for dtype, fp64_acc, tol in [
            (torch.float32, False, 1e-5),
            (torch.float32, True, 1e-6),
            (torch.float64, False, 1e-12),
        ]:
            a = torch.randn(n1, p, generator=g, dtype=torch.float64)
            b = torch.randn(n2, p, generator=g, dtype=torch.float64)
            ad, bd = a.to(dtype).to(device), b.to(dtype).to(device)
            base = torch.randn(n1, n1, generator=g, dtype=torch.float64)
            base = (base + base.T).to(dtype)  # accumulate into a symmetric, nonzero out
            out = base.to(device, copy=True)
            _ext.gram_sym(ad, out, fp64_acc=fp64_acc)
            truth = base.double() + ad.double().cpu() @ ad.double().cpu().T
            label = f"{str(dtype)[6:]}{' fp64-acc' if fp64_acc else ''}"
            sym_exact = bool((out == out.T).all())
            row(
                "gram_sym" + ("" if sym_exact else " (NOT symmetric)"),
                f"{n1}x{p}",
                label,
                rel_err(out.cpu(), truth) if sym_exact else float("inf"),
                tol,
            )
            out = torch.zeros(n1, n2, dtype=dtype, device=device)
            _ext.gram_cross(ad, bd, out, fp64_acc=fp64_acc)
            row(
                "gram_cross",
                f"{n1}x{n2}x{p}",
                label,
                rel_err(out.cpu(), ad.double().cpu() @ bd.double().cpu().T),
                tol,
            )
    geoms = [  # (C_in, C_out, H, W, k, stride, padding, dilation, groups)
        (3, 16, 32, 32, 3, 1, 1, 1, 1),
        (16, 32, 15, 17, 3, 2, 1, 1, 1),
        (8, 8, 9, 9, 3, 1, 2, 2, 8),
        (12, 6, 8, 8, 1, 1, 0, 1, 3),
        (4, 5, 11, 7, (3, 1), (2, 1), (1, 0), (1, 2), 1),
    ]
    for cin, cout, h, w, k, s_, p_, d_, grp in geoms:
        for dtype, tol in [(torch.float32, 1e-5), (torch.float64, 1e-12)]:
            x = torch.randn(5, cin, h, w, generator=g, dtype=torch.float64)
            wt = torch.randn(
                cout,
                cin // grp,
                *((k, k) if isinstance(k, int) else k),
                generator=g,
                dtype=torch.float64,
            )
            gout = torch.randn_like(F.conv2d(x, wt, stride=s_, padding=p_, dilation=d_, groups=grp))
            truth = torch.stack(
                [
                    torch.autograd.grad(
                        F.conv2d(
                            x[i : i + 1],
                            wt.requires_grad_(),
                            stride=s_,
                            padding=p_,
                            dilation=d_,
                            groups=grp,
                        ),
                        wt,
                        gout[i : i + 1],
                    )[0]
                    for i in range(x.shape[0])
                ]
            )
            got = _ext.conv2d_psg(
                x.to(dtype).to(device),
                gout.to(dtype).to(device),
                kernel_size=wt.shape[2:],
                stride=s_,
                padding=p_,
                dilation=d_,
                groups=grp,
            )
            row(
                "conv2d_psg",
                f"{cin}->{cout} {h}x{w} k{k} s{s_} p{p_} d{d_} g{grp}",
                str(dtype)[6:],
                rel_err(got.cpu(), truth),
                tol,
            )
    # the engine with method "csrc": the CUDA Gram and conv kernels inside fastntk.ntk
    for name in ("convzoo", "nb201", "resnet"):
        m, x1, x2 = zoo.make(name)
        ref = full_kernel(m, x1, x2)
        md = m.to(device)
        for dtype in (torch.float32, torch.float64):
            th = fastntk.ntk(
                md, x1.to(device), x2.to(device), output="sum", method="csrc", dtype=dtype
            )
            row(
                f"engine backend csrc: {name}",
                "sum",
                str(dtype)[6:],
                rel_err(th.cpu(), reduce(ref, "sum")),
                TOL[dtype],
            )
        m.cpu()
    lines += ["", "| N | columns | provider | s | TFLOP/s |", "|---|---|---|---|---|"]
    for n, cols in shapes:
        a = (torch.randn(n, cols, generator=g) + 1.0).to(device)
        flop = 2.0 * n * n * cols

        def cuda_gram(a=a, fp64_acc=False):
            return _ext.gram_sym(
                a, torch.zeros(a.shape[0], a.shape[0], device=device), fp64_acc=fp64_acc
            )

        for label, f in [
            ("torch.mm float32", lambda a=a: a @ a.T),
            ("csrc gram_sym float32", cuda_gram),
            ("csrc gram_sym fp64-acc", lambda: cuda_gram(fp64_acc=True)),
        ]:
            t = _time(f, device)
            lines.append(f"| {n} | {cols} | {label} | {t:.4f} | {flop / t / 1e12:.2f} |")
    return ok_all


def time_conv_paths(device: str, n: int, lines: list[str]) -> None:
    """Per-sample conv weight gradients at NB201 and ResNet shapes on the device: the
    engine's PyTorch strategies (grouped-convolution weight gradient; strided patches +
    bmm), the Triton kernel and the C++ extension's op (its CUDA kernel on a GPU). The
    data for choosing the conv path of "auto" on a GPU. Agreement: max relative
    difference to the grouped strategy."""
    from fastntk import _ext
    from fastntk.rules import Context, Workspace
    from fastntk.rules import conv as conv_rule

    lines += [
        "",
        f"## Per-sample conv weight gradients on {device}, N={n} (ms; rel. diff to grouped)",
        "",
        "| C_in->C_out | k | stride | map | grouped | patches+bmm | triton | C++ op |",
        "|---|---|---|---|---|---|---|---|",
    ]
    try:
        from fastntk.kernels.conv_psg import conv2d_psg as triton_psg
    except Exception as exc:  # reported in the table
        triton_psg, why = None, f"{type(exc).__name__}"
    for ci, co, h, k, st in [
        (16, 16, 32, 3, 1),
        (16, 16, 32, 1, 1),
        (16, 32, 32, 3, 2),
        (32, 32, 16, 3, 1),
        (64, 64, 8, 3, 1),
        (128, 128, 8, 3, 1),
        (256, 256, 4, 3, 1),
    ]:
        pad = k // 2
        mod = torch.nn.Conv2d(ci, co, k, stride=st, padding=pad, bias=False).to(device)
        g0 = torch.Generator(device="cpu").manual_seed(ci + co + h)
        x = torch.randn(n, ci, h, h, generator=g0).to(device)
        oh = (h + 2 * pad - k) // st + 1
        g = torch.randn(n, co, oh, oh, generator=g0).to(device)
        out = torch.empty(n, co * ci * k * k, device=device)
        ctx = Context("eval", "torch", Workspace())
        ref = None
        cells = []
        paths = [
            ("grouped", lambda: conv_rule._grouped_weight_grad(mod, x, g, 1, out)),
            ("patches", lambda: conv_rule._patches_weight_grad(mod, ctx, x, g, 1, out)),
        ]
        if triton_psg is not None:
            paths.append(
                ("triton", lambda: triton_psg(x, g, kernel_size=k, stride=st, padding=pad))
            )
        ok_cpp = _ext.cuda_available() if device == "cuda" else _ext.available()
        if ok_cpp:
            paths.append(
                ("cpp", lambda: _ext.conv2d_psg(x, g, kernel_size=k, stride=st, padding=pad))
            )
        got = {}
        for name, f in paths:
            try:
                t = _time(f, device, reps=5)
                r = f()
                r = (out if r is None else r).reshape(n, -1).double().cpu().clone()
                got[name] = (t, r)
            except Exception as exc:  # one path failing must not hide the others
                got[name] = (None, f"{type(exc).__name__}: {str(exc)[:40]}")
        ref = got["grouped"][1] if isinstance(got["grouped"][1], torch.Tensor) else None
        for name in ("grouped", "patches", "triton", "cpp"):
            if name not in got:
                cells.append("n/a" if name != "triton" or triton_psg is not None else why)
                continue
            t, r = got[name]
            if t is None:
                cells.append(r)
                continue
            diff = (
                ""
                if ref is None or name == "grouped"
                else (f" ({((r - ref).abs().max() / ref.abs().max()).item():.1e})")
            )
            cells.append(f"{1e3 * t:.2f}{diff}")
        lines.append(f"| {ci}->{co} | {k} | {st} | {h}x{h} | " + " | ".join(cells) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="markdown file, rewritten after each part (default: stdout only)")
    ap.add_argument("--parts", default="1,2,3,4", help="which parts to run, comma-separated")
    ap.add_argument("--conv-n", type=int, default=256, help="batch of the conv-path timing")
    ap.add_argument(
        "--gram-shapes",
        default="1024x36864,4096x9216,16384x2304",
        help="NxCOLS,... for parts 2 and 3 (small ones for a CPU smoke run)",
    )
    args = ap.parse_args()
    # float32 "exact" means IEEE float32: cuDNN convolutions default to TF32 on Ampere and
    # later (torch.backends.cudnn.allow_tf32 is True), about 1e-3 relative error, over the
    # 1e-4 tolerance of every float32 conv model. (Matmuls default to IEEE already.)
    defaults = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    parts = {int(v) for v in args.parts.split(",")}
    env = fastntk.env()
    lines = [
        f"# GPU checks: device {args.device} ({env.get('device_name')}), torch "
        f"{torch.__version__}, triton {env.get('triton_version')}, git {git_sha()}",
        "",
        f"Command: `python bench/gpu_check.py --parts {args.parts} --gram-shapes "
        f"{args.gram_shapes} --conv-n {args.conv_n}`",
        "",
        "TF32 off (torch.backends.cudnn.allow_tf32 = False, cuda.matmul.allow_tf32 = "
        "False): float32 is IEEE float32 except in the Triton tf32/bf16 modes.",
        "",
    ]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.gram_shapes.split(",")]

    def save() -> None:  # after every part: a run cut short keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    ok = True
    if 1 in parts:
        ok &= check_methods(args.device, lines, save)
        save()
    if 2 in parts:
        try:
            check_gram_modes(args.device, shapes, lines)
        except Exception as exc:  # part 2 is a measurement; report and go on
            lines.append(f"Gram modes failed: {type(exc).__name__}: {exc}")
        save()
    if 3 in parts:  # before part 4: the checks of never-run kernels before timings
        try:
            ok &= check_csrc(args.device, shapes, lines)
        except Exception as exc:  # reported, counted as a failure
            lines.append(f"C++ CUDA kernels failed: {type(exc).__name__}: {exc}")
            ok = False
        save()
    if 4 in parts:
        # timings for choosing auto's GPU conv path: at PyTorch's defaults, which the
        # engine runs with (cuDNN's grouped weight gradient is faster under TF32)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = defaults
        lines.append(
            f"\nPart 4 runs at PyTorch's TF32 defaults (cuDNN {defaults[0]}, "
            f"matmul {defaults[1]}), as fastntk.ntk does."
        )
        try:
            time_conv_paths(args.device, args.conv_n, lines)
        except Exception as exc:  # a measurement; report and go on
            lines.append(f"conv paths failed: {type(exc).__name__}: {exc}")
        save()
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
