"""Workloads and reference providers shared by the pytest-benchmark suites (bench/test_bench_*.py).

The same workload and baselines as ``bench/bench_engine.py`` (the fresh-process harness
that measures peak memory), written here as plain functions so that a benchmark can time
them in its own process:

* :func:`nb201_workload`: the NAS-Bench-201 benchmark network (``BENCH_ARCH``, eval
  BatchNorm, float32) and N images of the bundled CIFAR-10 sample (seeded standard-normal
  images beyond its size).
* :func:`vmap_jacrev_ntk`: the torch.func tutorial's kernel: the per-sample Jacobian from
  ``vmap(jacrev)``, then its Gram. It holds the whole (N, K·P) Jacobian.
* :func:`make_floor`: the least any exact method does: one plain forward+backward of the
  batch per output dimension (1 for "sum", K for "trace") plus the Gram of an (N, K·P)
  matrix (K accumulated (N, P) products for "trace").
* :func:`one_layer`: a model of one layer of each type that has a per-layer rule, with inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.func import functional_call, jacrev, vmap


def nb201_workload(n: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The NAS-Bench-201 benchmark network and its inputs.

    Args:
        n: number of images.
        seed: seeds the weights and the choice of images.

    Returns:
        (model in eval mode, (n, 3, 32, 32) float32 images).
    """
    import fastntk.data as data
    from fastntk.spaces.nb201 import BENCH_ARCH, build_model

    torch.manual_seed(seed)
    model = build_model(BENCH_ARCH, num_classes=10).eval()
    if n <= data.cifar10_size():
        x, _ = data.load_cifar10(n, seed=seed)
    else:
        x, _ = data.synthetic(n, seed=seed)
    return model, x


def _logits(out: object) -> torch.Tensor:
    """The model's logits: the last element of a tuple (NAS-Bench-201 returns (features, logits))."""
    return out[-1] if isinstance(out, (tuple, list)) else out


def vmap_jacrev_ntk(model: nn.Module, x: torch.Tensor, output: str = "sum") -> torch.Tensor:
    """Θ = J Jᵀ with J the per-sample Jacobian of torch.func ``vmap(jacrev)``.

    Args:
        model: maps (N, ...) to (N, ...) outputs (flattened to K per sample) or a tuple
            whose last element holds them; BatchNorm must be in eval mode (each sample
            alone).
        x: (N, ...) inputs.
        output: ``"sum"`` (the kernel of Σ_k f_k) or ``"trace"`` (Σ_k <∂f_k(x_i), ∂f_k(x_j)>).

    Returns:
        (N, N) kernel.
    """
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        out = _logits(functional_call(model, p, (xi.unsqueeze(0),))).reshape(-1)
        return out.sum() if output == "sum" else out

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # name -> (N, [K,] *shape)
    n = x.shape[0]
    # One Gram per parameter tensor, summed (as the torch.func tutorial does); "trace" sums
    # over k and the parameter's entries alike. One float32 product over the concatenated
    # (N, K·P) Jacobian instead was off by 2e-3 of max|Θ| on the NB201 network ("trace",
    # N=8, K·P = 8.3e6; its float64 Gram: 1e-7), the sum of blocks by 3e-5.
    blocks = [t.reshape(n, -1) for t in jac.values()]
    return sum(b @ b.T for b in blocks)


def make_floor(
    model: nn.Module, x: torch.Tensor, output: str = "sum"
) -> Callable[[], torch.Tensor]:
    """The floor of an exact kernel, as a function to time.

    Its Gram operand, a seeded random (N, P) matrix, is made here, outside the timed call.

    Args:
        model: as :func:`vmap_jacrev_ntk`.
        x: (N, ...) inputs.
        output: ``"sum"`` (one backward, one Gram) or ``"trace"`` (K of each).

    Returns:
        A function of no arguments returning the (N, N) Gram (of the random operand).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n, p_total = x.shape[0], sum(p.numel() for p in params)
    g = torch.randn(n, p_total, generator=torch.Generator().manual_seed(0))

    def run() -> torch.Tensor:
        out = _logits(model(x)).reshape(n, -1)
        k = out.shape[1] if output == "trace" else 1
        # the one-hot weights made once, as fastntk's output head does
        eye = torch.eye(out.shape[1], dtype=out.dtype) if k > 1 else None
        for j in range(k):
            w = torch.ones_like(out) if k == 1 else eye[j].expand_as(out).contiguous()
            torch.autograd.grad(out, params, grad_outputs=w, retain_graph=j < k - 1)
        theta = g @ g.T  # once per output dimension
        for _ in range(k - 1):
            theta.addmm_(g, g.T)
        return theta

    return run


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` on (N, L, E) inputs as queries, keys and values; returns
    the (N, L, E) attention output only."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


# the layer types with a per-layer rule in fastntk.rules that one_layer() builds
LAYERS = ("Linear", "Conv2d", "BatchNorm2d", "LayerNorm", "MultiheadAttention", "Embedding")


def one_layer(kind: str, n: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A model of one layer of type ``kind`` (one of :data:`LAYERS`), in eval mode, and inputs.

    Sizes are small (a CPU call takes milliseconds): Linear 256 -> 256 on (N, 256);
    Conv2d 16 -> 16 channels 3x3 on (N, 16, 16, 16); BatchNorm2d(16) on (N, 16, 16, 16);
    LayerNorm(128) on (N, 16, 128); self-attention E=64, 4 heads on (N, 16, 64);
    Embedding(1000, 64) on (N, 16) token ids.

    Returns:
        (model, inputs with n samples).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "Linear":
        model, x = nn.Linear(256, 256), torch.randn(n, 256, generator=g)
    elif kind == "Conv2d":
        model, x = nn.Conv2d(16, 16, 3, padding=1), torch.randn(n, 16, 16, 16, generator=g)
    elif kind == "BatchNorm2d":
        model, x = nn.BatchNorm2d(16), torch.randn(n, 16, 16, 16, generator=g)
        with torch.no_grad():  # running statistics and affine parameters other than 1, 0
            model.running_mean.uniform_(-1, 1, generator=g)
            model.running_var.uniform_(0.5, 2, generator=g)
            model.weight.uniform_(0.5, 2, generator=g)
            model.bias.uniform_(-1, 1, generator=g)
    elif kind == "LayerNorm":
        model, x = nn.LayerNorm(128), torch.randn(n, 16, 128, generator=g)
    elif kind == "MultiheadAttention":
        model, x = SelfAttention(64, 4), torch.randn(n, 16, 64, generator=g)
    elif kind == "Embedding":
        model, x = nn.Embedding(1000, 64), torch.randint(0, 1000, (n, 16), generator=g)
    else:
        raise ValueError(f"kind must be one of {LAYERS}, got {kind!r}")
    return model.eval(), x
