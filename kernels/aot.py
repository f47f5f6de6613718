"""Compile fastntk's Triton kernels for an NVIDIA GPU that is not here.

Triton compiles a kernel to PTX and a cubin (with the ``ptxas`` it ships) for any target
without a GPU; only loading and running one needs the device. :func:`compile_for` does
that for one specialisation (the constexprs and ``num_warps`` a launcher picks), so the
CPU machines check what the interpreter cannot: that each variant the launchers can pick
lowers for Hopper (sm_90) and Ampere (sm_80), which instructions it uses (``wgmma`` /
``mma`` tensor-core ops or plain FMAs), and its shared memory and register use, spills
(local memory) included, read off the cubin with the ``cuobjdump`` that Triton ships.
Works under TRITON_INTERPRET=1 too: the kernel's Python function is recompiled here.
In a process that has run kernels in Triton's interpreter, use :func:`compile_many`: it
compiles in a fresh process (Triton 3.6's interpreter leaves ``triton.language`` patched,
and compiling after it fails inside ``tl.load``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from . import TRITON_AVAILABLE


@dataclass(frozen=True)
class Compiled:
    """What one specialisation compiled to."""

    name: str
    arch: int
    ptx: str
    shared_bytes: int  #: shared memory Triton allocates for the kernel
    registers: int | None  #: per thread (None when cuobjdump is not there)
    local_bytes: int | None  #: local memory per thread: > 0 means register spills

    @property
    def tensor_cores(self) -> str | None:
        """``"wgmma"`` (Hopper warpgroup MMA), ``"mma"`` (Ampere-style MMA) or None."""
        if "wgmma.mma_async" in self.ptx:
            return "wgmma"
        if re.search(r"\bmma\.sync", self.ptx):
            return "mma"
        return None


def _python_function(kernel):
    """The undecorated function of a ``@triton.jit`` kernel (JIT or interpreted)."""
    f = kernel
    while not inspect.isfunction(f):
        f = f.fn
    return f


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def compile_for(
    kernel,
    constexprs: dict[str, object],
    *,
    arch: int = 90,
    num_warps: int = 4,
    pointer: str = "*fp32",
    pointers: dict[str, str] | None = None,
    scalar: str = "i32",
) -> Compiled:
    """Compile one specialisation of ``kernel`` for ``sm_<arch>``.

    Args:
        kernel: a ``@triton.jit`` function of this package.
        constexprs: a value for every ``tl.constexpr`` parameter.
        arch: compute capability times ten (90: H100/H200, 80: A100).
        num_warps: as the launcher passes it.
        pointer: Triton type of pointer arguments (those named ``*_ptr``);
            ``pointers`` overrides it per argument.
        scalar: Triton type of the other (integer) arguments.

    Returns:
        :class:`Compiled`. Raises what Triton raises when the kernel does not lower.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton is not importable")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(_python_function(kernel))
    signature: dict[str, str] = {}
    for p in fn.params:
        if p.is_constexpr:
            if p.name not in constexprs:
                raise ValueError(f"{fn.__name__}: no value for constexpr {p.name}")
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = (pointers or {}).get(p.name, pointer)
        else:
            signature[p.name] = scalar
    src = ASTSource(fn, signature, constexprs)
    k = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "enable_fp_fusion": True},
    )
    regs, local = _resources(k.asm["cubin"])
    return Compiled(fn.__name__, arch, k.asm["ptx"], int(k.metadata.shared), regs, local)


def compile_many(specs: list[dict]) -> list[Compiled]:
    """:func:`compile_for` for each spec, in one fresh Python process.

    Args:
        specs: dicts with ``kernel`` (``"module:name"``, e.g.
            ``"fastntk.kernels.gram:_gram_kernel"``) and :func:`compile_for`'s keyword
            arguments (``constexprs``, ``arch``, ``num_warps``, ``pointer``, ``pointers``,
            ``scalar``), all JSON-serialisable.

    Returns:
        one :class:`Compiled` per spec, in order. Raises RuntimeError with the child's
        error output when a spec does not compile.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", "from fastntk.kernels import aot; aot._child()"],
        input=json.dumps(specs), capture_output=True, text=True, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"compiling in a child process failed:\n{proc.stderr[-4000:]}")
    return [Compiled(**d) for d in json.loads(proc.stdout.splitlines()[-1])]


def _child() -> None:
    out = []
    for spec in json.loads(sys.stdin.read()):
        spec = dict(spec)
        module, name = spec.pop("kernel").split(":")
        kernel = getattr(importlib.import_module(module), name)
        out.append(dataclasses.asdict(compile_for(kernel, **spec)))
    sys.stdout.write("\n" + json.dumps(out) + "\n")


__all__ = ["Compiled", "compile_for", "compile_many"]
