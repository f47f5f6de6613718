"""The NTK operator (``fastntk.ntk_operator``), the exact diagonal (``fastntk.ntk_diag``) and
the metrics on them, against the dense kernel and one forward+backward of the batch.

The NAS-Bench-201 benchmark network (``nb201.BENCH_ARCH``), float32, synthetic
CIFAR-shaped images (the bundled sample holds 1,000), each section in a fresh process
(its peak RSS its own):

* ``products``: one product ``A @ V`` with k = 1 and k = 16 columns at N = 256 and 4,096
  (the first product of an operator, and a second: a side in one chunk keeps its graph;
  a streamed side's products all cost alike, so k = 16 there is timed once), against one
  forward+backward of the batch in the same 256-sample chunks;
* ``coupled``: ``bn="batch"`` at N = 64: λmax, the trace and LGA from the operator against
  the dense coupled kernel and the same metrics of it (values, bounds, products);
* ``diag``: ``ntk_diag`` at N = 50,000 (the dense float32 kernel would be 10 GB);
* ``eig``: the top 10 eigenvalues at N = 20,000 by Lanczos on the operator. Hours on a
  2-core CPU, so it resumes: with ``--journal DIR`` every product is stored there as it
  finishes (the column, its product, its seconds); a rerun replays the stored products
  (ARPACK, started from the same vector, asks for the same columns again) and computes
  only the rest. Its time is the sum of the products' seconds plus the last run's own;
  its peak the largest of its runs'.

    python bench/bench_operator.py --sections products,coupled --out bench/results/operator_cpu.md
    python bench/bench_operator.py --sections diag --out ...
    python bench/bench_operator.py --sections eig --journal bench/results/eig_journal \
        --out bench/results/operator_eig_cpu.md          # rerun until it reports (resumes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _child  # noqa: E402
from _meta import git_sha  # noqa: E402

SECTIONS = ("products", "coupled", "diag", "eig")


def _model():
    import torch

    from fastntk.spaces.nb201 import BENCH_ARCH, build_model

    torch.manual_seed(0)
    return build_model(BENCH_ARCH)


def _x(n: int):
    from fastntk.data import synthetic

    return synthetic(n, seed=0)[0]


def _t(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def products(n: int, ks: tuple[int, ...] = (1, 16)) -> list[dict]:
    import torch

    import fastntk

    m, x = _model(), _x(n)
    params = [p for p in m.parameters()]
    rows = []

    def fwd_bwd():
        for s in range(0, n, 256):
            y = m(x[s : s + 256])
            y = y[-1] if isinstance(y, tuple) else y
            torch.autograd.grad(y.sum(), params)

    m.eval()
    fwd_bwd()
    _, t = _t(fwd_bwd)
    rows.append({"what": f"forward+backward of the batch, N={n}", "time_s": t})
    for k in ks:
        A = fastntk.ntk_operator(m, x)
        V = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
        _, t1 = _t(lambda A=A, V=V: A @ V)
        rows.append({"what": f"A @ V, N={n}, k={k}: first product", "time_s": t1})
        # A side of several chunks keeps no graph: every product costs the first's (less the
        # forward-mode check on one chunk), so a second is timed for one column only.
        if k == 1 or n <= 256:
            _, t2 = _t(lambda A=A, V=V: A @ V)
            rows.append({"what": f"A @ V, N={n}, k={k}: second product", "time_s": t2})
    return rows


def coupled(n: int = 64) -> list[dict]:
    import torch

    import fastntk
    from fastntk.metrics import kernel as KM
    from fastntk.metrics import operator as OM

    m, x = _model(), _x(n)
    y = torch.arange(n) % 10
    K, t = _t(lambda: fastntk.ntk(m, x, bn="batch"))
    rows = [{"what": f"dense coupled kernel, N={n}", "time_s": t}]
    lam, t = _t(lambda: float(torch.linalg.eigvalsh(K.double())[-1]))
    rows.append({"what": "  λmax of it", "time_s": t, "value": lam})
    rows.append({"what": "  trace of it", "value": float(K.double().trace())})
    rows.append({"what": "  LGA of it", "value": KM.lga(K, y)})
    A = fastntk.ntk_operator(m, x, bn="batch")
    (_, est), t = _t(lambda: OM.top_eigenvalues(A, 1, tol=1e-6))
    rows.append({"what": "operator λmax (Lanczos)", "time_s": t, "value": est.value,
                 "bound": est.bound, "products": est.products})  # fmt: skip
    d, t = _t(lambda: fastntk.ntk_diag(m, x, bn="batch"))
    rows.append({"what": "exact trace (ntk_diag)", "time_s": t, "value": float(d.double().sum())})
    A = fastntk.ntk_operator(m, x, bn="batch")
    est, t = _t(lambda: OM.lga(A, y))
    rows.append({"what": "operator LGA (C products + Hutch++)", "time_s": t, "value": est.value,
                 "bound": est.bound, "products": est.products})  # fmt: skip
    return rows


def diag(n: int = 50000) -> list[dict]:
    import fastntk

    m, x = _model(), _x(n)
    d, t = _t(lambda: fastntk.ntk_diag(m, x))
    return [{"what": f"ntk_diag, N={n}", "time_s": t, "value": float(d.double().sum())}]


def eig(n: int = 20000, journal: str | None = None) -> list[dict]:
    import fastntk
    from fastntk.metrics import operator as OM

    m, x = _model(), _x(n)
    A = fastntk.ntk_operator(m, x)
    J = Journaled(A, journal) if journal else A
    (lam, est), t = _t(lambda: OM.top_eigenvalues(J, 10, tol=1e-4))
    time_s = t if not journal else J.replayed_s + t
    rows = [{"what": f"top-10 eigenvalues, N={n}", "time_s": time_s, "value": float(lam[0]),
             "bound": est.bound, "products": est.products}]  # fmt: skip
    rows += [{"what": f"  λ{i + 1}", "value": float(v)} for i, v in enumerate(lam[1:], 1)]
    if journal:
        rows[0]["what"] += f" ({J.runs} runs, {J.replayed} products replayed in the last)"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows[0]["peak_mib"] = max(J.peak_mib, peak)  # (the largest of the runs')
    return rows


class Journaled:
    """An operator whose products are journalled in a folder: each column's product is
    stored (``<sha1 of the column>.npy``, with its seconds in ``log.jsonl``) when it
    finishes, and a column met again is read back. Metrics see ``shape``, ``dtype``,
    ``products``, ``@`` and :meth:`to_scipy`, as on the operator."""

    def __init__(self, A, folder: str):
        import numpy as np

        self.A, self.folder = A, folder
        self.shape, self.dtype = A.shape, A.dtype
        self.products, self.replayed, self.replayed_s = 0, 0, 0.0
        os.makedirs(folder, exist_ok=True)
        self.log = os.path.join(folder, "log.jsonl")
        self.seconds: dict[str, float] = {}
        self.runs, self.peak_mib = 1, 0.0
        if os.path.exists(self.log):
            with open(self.log) as f:
                for ln in f:
                    rec = json.loads(ln)
                    if rec.get("shape") not in (None, list(self.shape)):
                        raise SystemExit(f"{folder} journals another operator: {rec}")
                    if "run" in rec:
                        self.runs += 1
                    else:
                        self.seconds[rec["key"]] = rec["seconds"]
                        self.peak_mib = max(self.peak_mib, rec.get("peak_mib", 0.0))
        with open(self.log, "a") as f:
            f.write(json.dumps({"run": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "shape": list(self.shape)}) + "\n")  # fmt: skip
        self._np = np

    def _column(self, v):
        import hashlib

        import torch

        np = self._np
        v = np.ascontiguousarray(v, dtype=np.float64)
        key = hashlib.sha1(v.tobytes()).hexdigest()
        path = os.path.join(self.folder, key + ".npy")
        if key in self.seconds and os.path.exists(path):
            self.replayed += 1
            self.replayed_s += self.seconds[key]
            return np.load(path)
        t = time.perf_counter()
        out = (self.A @ torch.from_numpy(v).to(self.dtype)).double().numpy()
        dt = time.perf_counter() - t
        np.save(path + ".tmp.npy", out)
        os.replace(path + ".tmp.npy", path)  # (a stored product is whole)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak_mib = max(self.peak_mib, peak)
        with open(self.log, "a") as f:
            f.write(json.dumps({"key": key, "seconds": dt, "peak_mib": peak}) + "\n")
        self.seconds[key] = dt
        self.replayed_s += dt
        return out

    def _product(self, v):
        """A @ v for a float64 array v of shape (n,) or (n, k), column by column."""
        np = self._np
        cols = v[:, None] if v.ndim == 1 else v
        self.products += cols.shape[1]
        out = np.stack([self._column(cols[:, j]) for j in range(cols.shape[1])], 1)
        return out[:, 0] if v.ndim == 1 else out

    def __matmul__(self, V):
        import torch

        return torch.from_numpy(self._product(V.double().numpy())).to(self.dtype)

    def to_scipy(self):
        from scipy.sparse.linalg import LinearOperator

        def mv(v):
            return self._product(self._np.asarray(v, dtype=self._np.float64))

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mv, rmatmat=mv,
                              dtype=self._np.float64)  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="products,coupled")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--products-n", default="256,4096", help="N of the products section")
    ap.add_argument("--products-k", default="1,16", help="columns of the products section")
    ap.add_argument("--diag-n", type=int, default=50000)
    ap.add_argument("--eig-n", type=int, default=20000)
    ap.add_argument("--journal", help="eig: store every product in this folder (resumes)")
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch

        spec = json.loads(args.child)
        torch.set_num_threads(spec["threads"])
        what, n = spec["section"], spec.get("n")
        fn = {"products": products, "coupled": coupled, "diag": diag, "eig": eig}[what]
        if what == "products":
            rows = fn(n, tuple(spec["ks"]))
        elif what == "eig":
            rows = fn(n, spec.get("journal"))
        else:
            rows = fn(*([n] if n else []))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        _child.report({"rows": rows, "peak_mib": peak})
        return 0
    results = []
    for section in args.sections.split(","):
        products_n = [int(v) for v in args.products_n.split(",")]
        ns = {"products": products_n, "diag": [args.diag_n], "eig": [args.eig_n]}.get(
            section, [None]
        )
        for n in ns:
            spec = {"section": section, "n": n, "threads": args.threads,
                    "ks": [int(v) for v in args.products_k.split(",")],
                    "journal": args.journal}  # fmt: skip
            res = _child.run(__file__, spec)
            if "error" in res:
                raise SystemExit(f"{section} failed: {res['error']}")
            print(section, n, res, file=sys.stderr, flush=True)
            results.append((section, res))
    table = _table(results, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


def _table(results, args) -> str:
    import torch

    lines = [
        "## The NTK operator, the exact diagonal and the metrics on them",
        "",
        f"`python bench/bench_operator.py {' '.join(sys.argv[1:])}`; NB201 benchmark network, "
        f"float32, synthetic CIFAR-shaped images; {platform.machine()}, {os.cpu_count()} "
        f"CPUs, {args.threads} threads, torch {torch.__version__}, commit {git_sha()}, "
        f"{time.strftime('%Y-%m-%d')}. Peak: the section's process RSS.",
        "",
        "| section | what | time | value | bound | products | peak (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for section, res in results:
        for r in res["rows"]:
            lines.append(
                f"| {section} | {r['what']} | "
                + (f"{r['time_s']:.3f} s" if "time_s" in r else "–")
                + " | "
                + (f"{r['value']:.6g}" if "value" in r else "–")
                + " | "
                + (f"{r['bound']:.3g}" if "bound" in r else "–")
                + f" | {r.get('products', '–')} | {r.get('peak_mib', res['peak_mib']):.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
