"""``python -m fastntk demo``: the NTK of a NAS-Bench-201 network on real CIFAR-10 images.

Prints the kernel's size, a spectrum summary (λmax, λmin, condition number,
trace, the eigenvalue mass in the top ⌈√N⌉ eigenvalues), the LGA of the kernel
with the images' labels, the time of a first and a warm call (with the warm call's
phases), the peak memory, and how the call's paths were chosen.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time

import torch

from fastntk.cli.args import seed_arg


def _images(s: str) -> int:
    from fastntk.data import cifar10_size

    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n must be an integer, got {s!r}") from None
    if not 1 <= n <= cifar10_size():
        raise argparse.ArgumentTypeError(
            f"--n must be between 1 and {cifar10_size()} (the bundled CIFAR-10 sample), got {n}"
        )
    return n


def _output(s: str) -> str | int:
    try:
        return int(s)
    except ValueError:
        pass
    if s not in ("sum", "trace", "mean"):
        why = (" (the demo summarises an (N, N) kernel; output='full' is the API's: "
               "fastntk.ntk(model, x, output='full'))" if s == "full" else "")  # fmt: skip
        raise argparse.ArgumentTypeError(
            f"--output must be sum, trace, mean or an integer (one logit), got {s!r}{why}"
        )
    return s


def main(argv: list[str] | None = None) -> int:
    import fastntk
    from fastntk import data
    from fastntk.spaces import nb201

    ap = argparse.ArgumentParser(prog="fastntk demo", description=__doc__)
    ap.add_argument("--arch", default=nb201.BENCH_ARCH, help="NAS-Bench-201 arch string")
    ap.add_argument("--n", type=_images, default=128, help="number of CIFAR-10 images (<= 1000)")
    ap.add_argument(
        "--output", default="sum", type=_output, help="sum | trace | mean | an integer (one logit)"
    )
    ap.add_argument("--bn", default="eval", choices=["eval", "batch", "per_sample"])
    ap.add_argument("--seed", type=seed_arg, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = nb201.build_model(args.arch, num_classes=10)
    x, y = data.load_cifar10(args.n, seed=args.seed)
    nparams = sum(p.numel() for p in model.parameters())
    print(
        f"fastntk {fastntk.__version__} demo  (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    print(f"architecture  {args.arch}")
    print(
        f"              {nparams:,} parameters; true CIFAR-10 test accuracy "
        f"{nb201.accuracy(args.arch, 'cifar10'):.2f}% after 200 epochs"
    )
    print(f"data          {args.n} real CIFAR-10 images (bundled sample), seed {args.seed}")
    print(f"kernel        output={args.output!r}, bn={args.bn!r}, float32, method='auto'")
    tuned = fastntk.env().get("allocator_tuned")
    print(
        "allocator     "
        + (
            "glibc tuned to keep freed memory (FASTNTK_TUNE_ALLOCATOR=1)"
            if tuned
            else "as the process found it (FASTNTK_TUNE_ALLOCATOR=1 tunes glibc)"
        )
    )
    t0 = time.perf_counter()
    theta = fastntk.ntk(model, x, output=args.output, bn=args.bn)
    dt = time.perf_counter() - t0
    # a second, warm call: what every further kernel of a search costs (the first one also
    # pays one-time set-up: loading the C++ extension, creating oneDNN primitives)
    with fastntk.profile() as prof:
        t0 = time.perf_counter()
        again = fastntk.ntk(model, x, output=args.output, bn=args.bn)
        warm = time.perf_counter() - t0
    if not torch.equal(again, theta):
        print("warning: the second call gave a different kernel", file=sys.stderr)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ev = torch.linalg.eigvalsh(theta.double())
    lmax, lmin = ev[-1].item(), ev[0].item()
    k = math.ceil(math.sqrt(args.n))
    print()
    print(
        f"Θ             {tuple(theta.shape)} {theta.dtype}, first call {dt:.2f} s, warm call "
        f"{warm:.2f} s ({args.n / warm:.0f} samples/s), peak memory {peak:.2f} GiB (whole process)"
    )
    phases = "  ".join(
        f"{k[:-2]} {v:.2f}" for k, v in prof.as_dict().items() if k.endswith("_s") and v > 0.005
    )
    print(f"warm call     seconds by phase: {phases}")
    from fastntk import metrics
    from fastntk.errors import FastNTKError

    try:  # the float32 kernel's condition number, by the metrics' clamping rule
        c = metrics.condition_number(theta)
        cond = f"{c:.4g}"
        if math.isinf(c) and lmin > 0:
            limit = 1 / (args.n * torch.finfo(theta.dtype).eps)
            cond += f" (beyond the {limit:.2g} a {theta.dtype} kernel of N={args.n} resolves)"
    except FastNTKError as e:
        cond = f"undefined ({e})"
    print(f"spectrum      λmax {lmax:.4g}   λmin {lmin:.4g}   cond {cond}")
    print(
        f"              trace {ev.sum().item():.4g}   top-{k} eigenvalue mass "
        f"{(ev[-k:].sum() / ev.sum()).item():.3f}   ‖Θ‖_F {metrics.fnorm(theta):.4g}"
    )
    try:
        lga = f"{metrics.lga(theta, y):.4f}"
    except FastNTKError as e:  # a constant kernel, one class in the batch
        lga = f"undefined ({e})"
    print(f"metrics       LGA {lga}   mean(Θ) {metrics.mean(theta):.4g}")
    print()
    print("paths (fastntk.explain):")
    ex = fastntk.explain(model, x, output=args.output, bn=args.bn)
    counts: dict[str, int] = {}
    for p in ex.params:
        counts[p.path] = counts.get(p.path, 0) + 1
    for path, c in sorted(counts.items()):
        print(f"  {c:3d} parameter tensors  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
