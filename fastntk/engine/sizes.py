"""The byte budgets that size a call's chunks, blocks and panels, and the device's memory.

Read at call time (``sizes.BLOCK_BYTES``), so a test or a benchmark may change one for a
call.
"""

from __future__ import annotations

import os

import torch

# Byte budgets; chosen for the 24 GB development CPU (NB201 C=16 at N=256 needs about 2 GB
# for forward+backward).
BLOCK_BYTES = 256 * 2**20  # one per-sample gradient block (rows x columns)
PANEL_BYTES = 4 * 2**30  # per-sample gradients kept for a panel of rows (at least)
JAC_BYTES = 2 * 2**30  # coupled path: Jacobian rows kept at once
GRAM_BUFFER_BYTES = 16 * 2**20  # small dense blocks batched into one Gram
GRAM_DIRECT_BYTES = 2**20  # a dense block this big gets its own GEMM (no copy into the buffer)
# "trace"/"mean": keep all logits' output gradients (K x one pass's) up to this size and
# compute each layer's per-sample gradients for all logits at once; above it, stream
# logit by logit (the memory targets at large N).
BATCH_PASSES_BYTES = 2 * 2**30


def panel_budget(device: torch.device) -> int:
    """Bytes of per-sample gradients a panel keeps: PANEL_BYTES, or on a CUDA device an
    eighth of its memory where that is more (an H200: 17 GiB, NB201 "trace" N=1024 in two
    panels instead of four; fewer panels, fewer chunk recomputations. Not yet measured)."""
    if device.type == "cuda":
        return max(PANEL_BYTES, torch.cuda.get_device_properties(device).total_memory // 8)
    return PANEL_BYTES


def device_memory(device: torch.device) -> int:
    """The device's memory in bytes (a CPU: the physical memory); 2**63 where unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return 2**63
