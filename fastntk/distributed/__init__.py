"""fastntk across processes, GPUs and machines, on ``torch.distributed``.

:func:`ntk` splits one exact kernel into tiles over the ranks of a process group (each
rank runs the single-process engine on its tiles; ``out=`` writes a memory-mapped kernel
that no rank holds and a rerun resumes); :func:`ntk_sketch` shards the samples of a
sketch. Start the program with ``torchrun``:

    torchrun --standalone --nproc-per-node=2 my_kernel.py                  # one machine
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 my_kernel.py                            # two machines

where ``my_kernel.py`` calls ``fastntk.distributed.ntk(model, x, out="K.npy")`` on every
rank. Architecture scoring over workers is ``fastntk search|evaluate --workers W``
(:mod:`fastntk.search.workers`).
"""

from fastntk.distributed.group import Group, join, spawn_local
from fastntk.distributed.kernel import ntk, ntk_sketch

__all__ = ["Group", "join", "ntk", "ntk_sketch", "spawn_local"]
