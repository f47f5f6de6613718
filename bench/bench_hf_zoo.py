"""fastntk on Hugging Face ``transformers`` models: time, peak memory and routes.

Each model of the zoo (small configs, no weights downloaded, float32, seeded) at
``--n`` samples (default 64), for ``output="sum"`` and ``"trace"``: ``fastntk.ntk`` with
``method="auto"`` and ``"layerwise"``, torch.func ``vmap(jacrev)`` (``method="vmap"``), and
the floor, one forward+backward of the batch plus the Gram matmul of an (n, P) matrix
(``n^2 P`` multiply-adds, in blocks of 2^20 columns; for "trace", K backward passes and
K Gram matmuls). Every measurement runs in a fresh process (its peak RSS its own): one
warm-up call, then the median of ``--repeat`` calls. ``fastntk.explain`` gives how many
parameter tensors take a module rule, a node rule (``fastntk.rules.nodes``) or a
fallback.

With ``--alternate R``, each model and output also gets one more process that times
``auto``, ``vmap`` and the floor in turn, R rounds (the order rotating): the median of
each, and the median over rounds of each round's vmap/auto and auto/floor. On a shared or
noisy machine the per-process medians of one model drift between reruns by more than the
ratios in question (bench/results/hf_zoo_cpu.md: ResNet's "sum" auto/floor 1.92 per process,
1.36 in turn); ratios within a round do not (both methods see the same state of the
machine and allocator).

    python bench/bench_hf_zoo.py --out bench/results/hf_zoo_cpu.md        # ~15 min, 2 cores
    python bench/bench_hf_zoo.py --models bert,gpt2-lm --outputs sum      # a subset
    python bench/bench_hf_zoo.py --methods none --alternate 15 --out ...  # ratios alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _child  # noqa: E402
from _meta import git_sha  # noqa: E402

V, T, K = 512, 32, 10  # vocabulary, sequence length, classes
# name -> (transformers model class, its config class, config, inputs: "images" | "tokens")
ZOO = {
    "vit": ("ViTForImageClassification", "ViTConfig", dict(
        image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
        intermediate_size=768, num_labels=K), "images"),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", dict(
        num_stages=3, hidden_sizes=[32, 64, 128], depths=[2, 2, 2], num_labels=K,
        image_size=32), "images"),
    "resnet": ("ResNetForImageClassification", "ResNetConfig", dict(
        embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
        num_labels=K), "images"),
    "swin": ("SwinForImageClassification", "SwinConfig", dict(
        image_size=32, patch_size=2, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
        window_size=4, num_labels=K), "images"),
    "bert": ("BertForSequenceClassification", "BertConfig", dict(
        vocab_size=V, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=64, num_labels=K), "tokens"),
    # a pad token set, as users do for batches: GPT-2's padding check calls .item()
    "gpt2-classifier": ("GPT2ForSequenceClassification", "GPT2Config", dict(
        vocab_size=V, n_positions=64, n_embd=128, n_layer=2, n_head=4, num_labels=K,
        pad_token_id=0), "tokens"),
    # the LM head (tied to the token embedding), its last position's logits: K = 64 words
    "gpt2-lm": ("GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=64, n_positions=64, n_embd=128, n_layer=2, n_head=4), "tokens"),
    # (its sequence classifier reads the hidden state at the one <eos> token each input ends with)
    "t5": ("T5ForSequenceClassification", "T5Config", dict(
        vocab_size=V, d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        num_labels=K), "tokens+eos"),
    "llama": ("LlamaForSequenceClassification", "LlamaConfig", dict(
        vocab_size=V, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_labels=K, pad_token_id=0), "tokens"),
}  # fmt: skip
METHODS = ("auto", "layerwise", "vmap", "floor")
NODE_RULES = ("BroadcastRule", "ScaleRule", "LayerNormNodeRule", "MatmulRule", "SampleFreeRule")


def build(name: str):
    """(the model as ``fastntk`` sees it: its logits (n, K), its inputs for ``n`` samples)."""
    import torch
    import torch.nn as nn
    import transformers

    transformers.logging.set_verbosity_error()
    cls, config, kw, kind = ZOO[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = getattr(transformers, cls)(getattr(transformers, config)(**kw))

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = inner

        def forward(self, x):
            y = self.model(x).logits
            return y[:, -1] if y.dim() == 3 else y  # an LM: its last position

    def inputs(n: int):
        g = torch.Generator().manual_seed(1)
        if kind == "images":
            return torch.randn(n, 3, 32, 32, generator=g)
        if kind == "tokens+eos":  # tokens 2.. (0: pad, 1: <eos>), <eos> last
            x = torch.randint(2, kw["vocab_size"], (n, T), generator=g)
            x[:, -1] = kw["eos_token_id"]
            return x
        return torch.randint(1, kw["vocab_size"], (n, T), generator=g)

    return Logits().train(), inputs


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    import fastntk

    torch.set_num_threads(spec["threads"])
    model, inputs = build(spec["model"])
    x = inputs(spec["n"])
    output, method = spec["output"], spec["method"]
    if method == "alternate":
        return _alternate(model, x, output, spec["repeat"])
    if method == "floor":
        run = _floor(model, x, output)
    else:

        def run():
            return fastntk.ntk(model, x, output=output, method=method, progress=False)

    out = {}
    try:
        run()  # warm-up
        times = []
        for _ in range(spec["repeat"]):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        out["time_s"] = statistics.median(times)
    except Exception as e:  # a row, not a crash of the table
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:90]
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


ALTERNATED = ("auto", "vmap", "floor")


def _alternate(model, x, output: str, rounds: int) -> dict:
    """``ALTERNATED`` timed in turn in this one process, ``rounds`` rounds (the order
    rotating): each one's median, and the medians of the rounds' ratios. A method that
    cannot compute the model (vmap on a model torch.func cannot trace) leaves the rotation
    with its error."""
    import fastntk

    runs = {
        m: (_floor(model, x, output) if m == "floor" else
            lambda m=m: fastntk.ntk(model, x, output=output, method=m, progress=False))
        for m in ALTERNATED
    }  # fmt: skip
    out: dict = {}
    for m, run in list(runs.items()):
        try:
            run()  # warm-up
        except Exception as e:  # a cell, not a crash of the table
            out[m + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            del runs[m]
    times: dict[str, list[float]] = {m: [] for m in runs}
    names = list(runs)
    for r in range(rounds):
        for m in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            runs[m]()
            times[m].append(time.perf_counter() - t)
    out.update({m: statistics.median(ts) for m, ts in times.items()})
    for a, b in (("vmap", "auto"), ("auto", "floor")):
        if a in times and b in times:
            ratios = (ta / tb for ta, tb in zip(times[a], times[b], strict=True))
            out[f"{a}/{b}"] = statistics.median(ratios)
    return out


def _floor(model, x, output):
    """One forward+backward of the batch (K of them for "trace") and the Gram matmul(s)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    n = x.shape[0]
    block = min(P, 2**20)
    G = torch.randn(n, block)

    def run():
        with fastntk_eval(model):
            y = model(x)
        passes = [y.sum()] if output == "sum" else [y[:, k].sum() for k in range(y.shape[1])]
        for k, s in enumerate(passes):
            torch.autograd.grad(s, params, retain_graph=k < len(passes) - 1, allow_unused=True)
            done = 0
            while done < P:
                w = min(block, P - done)
                G[:, :w] @ G[:, :w].T
                done += w

    return run


class fastntk_eval:
    """The model in eval mode for the floor's forward, as fastntk runs dropout."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def routes(name: str) -> dict:
    """How many parameter tensors take a module rule, a node rule, a fallback or another
    path (``fastntk.explain`` on 16 samples)."""
    import fastntk

    model, inputs = build(name)
    counts = {"rule": 0, "node rule": 0, "fallback": 0, "other": 0}
    ex = fastntk.explain(model, inputs(16))
    for p in ex.params:
        if p.path.startswith("rule:"):
            kind = "node rule" if p.path[5:].split(" ")[0] in NODE_RULES else "rule"
        else:
            kind = "fallback" if p.path.startswith("fallback") else "other"
        counts[kind] += 1
    counts["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    counts["strategy"] = ex.strategy
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--outputs", default="sum,trace")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--alternate",
        type=int,
        default=0,
        metavar="R",
        help="also time auto, vmap and the floor in turn in one process, R rounds",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument(
        "--out",
        help="also write the table (markdown) here, and each measurement "
        "to the same name with .jsonl (a rerun of some models replaces theirs)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child.report(child(json.loads(args.child)))
        return 0
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in ZOO]
    if bad:
        ap.error(f"unknown model {bad[0]!r}; known: {', '.join(ZOO)}")
    log = os.path.splitext(args.out)[0] + ".jsonl" if args.out else None
    methods = [m for m in args.methods.split(",") if m and m != "none"]
    if [m for m in methods if m not in METHODS]:
        ap.error(f"--methods: known {', '.join(METHODS)} (or none, with --alternate)")
    if args.alternate:
        methods.append("alternate")
    for name in models:
        for output in args.outputs.split(","):
            for method in methods:
                repeat = args.alternate if method == "alternate" else args.repeat
                spec = dict(model=name, output=output, method=method, n=args.n,
                            repeat=repeat, threads=args.threads)  # fmt: skip
                res = _child.run(__file__, spec, timeout=args.timeout)
                res.update(model=name, output=output, method=method, repeat=repeat,
                           commit=git_sha(), argv=" ".join(sys.argv[1:]))  # fmt: skip
                print(f"{name} {output} {method}: {res}", file=sys.stderr, flush=True)
                if log:
                    with open(log, "a") as f:
                        f.write(json.dumps(res) + "\n")
    measured: dict[tuple[str, str], dict] = {}
    lines = []
    if log and os.path.exists(log):
        with open(log) as f:
            lines = [json.loads(ln) for ln in f if ln.strip()]
    for res in lines:  # (the latest of each measurement)
        measured.setdefault((res["model"], res["output"]), {})[res["method"]] = res
    rows = []
    for name in ZOO:
        outs = [o for (m, o) in measured if m == name]
        if outs:
            info = routes(name)
            rows += [{"model": name, "output": o, **info, **measured[(name, o)]} for o in outs]
    table = _table(rows, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


def _cell(res: dict | None) -> str:
    if not res:
        return "–"
    if "time_s" not in res:
        return f"error: {res.get('error', '?')}"
    return f"{res['time_s']:.3f} s, {res['peak_mib']:.0f} MiB"


def _commands(rows) -> str:
    """The commands (and commits) that measured ``rows``."""
    runs = sorted({(m["argv"], m.get("commit", "?")) for r in rows for m in r.values()
                   if isinstance(m, dict) and "argv" in m})  # fmt: skip
    return "; ".join(f"`python bench/bench_hf_zoo.py {a}` at {c}" for a, c in runs)


def _short(error: str) -> str:
    """An error's type, for a table cell."""
    return error.split(":")[0] if error != "–" else error


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "time_s" not in a or "time_s" not in b:
        return "–"
    return f"{a['time_s'] / b['time_s']:.2f}"


def _table(rows, args) -> str:
    import torch

    lines = [
        f"## Hugging Face models: fastntk against vmap(jacrev) and the floor, n={args.n}, float32",
        "",
        f"{_commands(rows)} (each row of the `.jsonl` beside the table names its command, "
        "commit and repeats); "
        f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, torch "
        f"{torch.__version__}, table of {time.strftime('%Y-%m-%d')}. Median of the repeated "
        "calls after a warm-up, each measurement in a fresh process (peak: its RSS). Floor: one "
        "forward+backward of the batch (K for trace) and the n×P Gram matmul(s). Routes "
        "(`fastntk.explain`): parameter tensors on a module rule / a node rule / a "
        "fallback.",
        "",
        "| model | params | routes (rule/node/fallback) | output | auto | layerwise | vmap(jacrev)"
        " | floor | auto/floor | vmap/auto |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not any(m in r for m in METHODS):
            continue
        lines.append(
            f"| {r['model']} | {r['params_m']:.2f}M | {r['rule']}/{r['node rule']}/"
            f"{r['fallback']} | {r['output']} | {_cell(r.get('auto'))} | "
            f"{_cell(r.get('layerwise'))} | {_cell(r.get('vmap'))} | {_cell(r.get('floor'))} | "
            f"{_ratio(r.get('auto'), r.get('floor'))} | {_ratio(r.get('vmap'), r.get('auto'))} |"
        )
    alt = [r for r in rows if r.get("alternate")]
    if alt:
        lines += [
            "",
            "### In turn in one process",
            "",
            "`--alternate R`: auto, vmap(jacrev) and the floor timed in turn, R rounds, the "
            "order rotating; medians of each, and of each round's ratios.",
            "",
            "| model | output | rounds | auto | vmap(jacrev) | floor | vmap/auto | auto/floor "
            "| commit |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in alt:
            a = r["alternate"]
            cells = [f"{a[m]:.3f} s" if m in a else _short(a.get(m + "_error", "–"))
                     for m in ALTERNATED]  # fmt: skip
            cells += [f"{a[k]:.2f}" if k in a else "–" for k in ("vmap/auto", "auto/floor")]
            cells.append(a.get("commit", "?"))
            lines.append(f"| {r['model']} | {r['output']} | {a['repeat']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
