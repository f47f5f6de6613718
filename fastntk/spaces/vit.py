"""Vision Transformers for 32x32 images, a small ViT search space, and a ViT-Small-ish model.

An architecture is ``(depth, embed_dim, heads, mlp_ratio, patch)``; its string
is ``d{depth}-e{embed_dim}-h{heads}-m{mlp_ratio}-p{patch}``, e.g.
``d6-e384-h6-m4-p4``. Every embedding width in :data:`EMBED_DIMS` is divisible
by every head count in :data:`HEADS`.

The model is a pre-norm ViT: patch embedding (Conv2d with kernel = stride =
patch), a class token, learned position embeddings, ``depth`` blocks of
LayerNorm -> multi-head self-attention (explicit ``qkv``/``proj`` Linear layers,
so per-layer NTK rules see plain Linear layers) and LayerNorm -> MLP (GELU),
a final LayerNorm and a Linear head on the class token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from fastntk.errors import ArchitectureError
from fastntk.spaces.base import ChoiceSpace, exact_ints, positive_int

__all__ = [
    "DEPTHS",
    "EMBED_DIMS",
    "HEADS",
    "MLP_RATIOS",
    "PATCHES",
    "ViT",
    "ViTSpace",
    "build_model",
    "vit_small",
]

DEPTHS: tuple[int, ...] = (1, 2, 4, 6, 8, 12)
EMBED_DIMS: tuple[int, ...] = (96, 192, 288, 384)
HEADS: tuple[int, ...] = (2, 3, 4, 6)
MLP_RATIOS: tuple[int, ...] = (1, 2, 3, 4)
PATCHES: tuple[int, ...] = (4, 8)
_FIELDS = (("d", DEPTHS), ("e", EMBED_DIMS), ("h", HEADS), ("m", MLP_RATIOS), ("p", PATCHES))

Arch = tuple[int, int, int, int, int]


def validate(arch) -> Arch:
    if isinstance(arch, str):
        return decode(arch)
    vals = exact_ints(arch, "a ViT arch is (depth, embed_dim, heads, mlp_ratio, patch)")
    if len(vals) != len(_FIELDS):
        raise ArchitectureError(
            f"a ViT arch has {len(_FIELDS)} fields (depth, embed_dim, heads, mlp_ratio, patch), "
            f"got {len(vals)}"
        )
    for (key, allowed), v in zip(_FIELDS, vals, strict=True):
        if v not in allowed:
            raise ArchitectureError(f"ViT field {key}={v} not in {', '.join(map(str, allowed))}")
    return vals  # type: ignore[return-value]


def encode(arch) -> str:
    return "-".join(f"{k}{v}" for (k, _), v in zip(_FIELDS, validate(arch), strict=True))


def decode(s: str) -> Arch:
    if not isinstance(s, str) or not s:
        raise ArchitectureError(f"a ViT arch must be a non-empty string, got {s!r}")
    parts = s.split("-")
    if len(parts) != len(_FIELDS):
        raise ArchitectureError(
            f"a ViT arch is 'd<depth>-e<dim>-h<heads>-m<mlp_ratio>-p<patch>' "
            f"(e.g. 'd6-e384-h6-m4-p4'), got {s!r}"
        )
    vals = []
    for (key, _), p in zip(_FIELDS, parts, strict=True):
        if not p.startswith(key) or not p[1:].isascii() or not p[1:].isdigit():
            raise ArchitectureError(f"ViT field {p!r} should be '{key}<int>', in {s!r}")
        vals.append(int(p[1:]))
    return validate(vals)


class Attention(nn.Module):
    """Multi-head self-attention with explicit ``qkv`` and ``proj`` Linear layers."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Pre-norm ViT; ``x: (N, 3, image_size, image_size)`` -> logits ``(N, num_classes)``."""

    def __init__(self, arch, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        depth, dim, heads, mlp_ratio, patch = validate(arch)
        num_classes = positive_int("num_classes", num_classes)
        if image_size % patch:
            raise ArchitectureError(f"image size {image_size} is not a multiple of patch {patch}")
        T = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, T + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def build_model(arch, num_classes: int = 10) -> ViT:
    return ViT(arch, num_classes=num_classes)


def vit_small(num_classes: int = 10, depth: int = 6) -> ViT:
    """ViT-Small-ish for 32x32: patch 4 (64 tokens + class token), width 384, 6 heads,
    MLP 1536, ``depth`` blocks (ViT-S has 12; the default 6 keeps CPU benchmarks
    practical: 10.7M parameters)."""
    return ViT((depth, 384, 6, 4, 4), num_classes=num_classes)


class ViTSpace(ChoiceSpace):
    """The ViT space as a :class:`fastntk.spaces.base.SearchSpace` (archs: 5-tuples)."""

    name = "vit"

    def __repr__(self) -> str:
        return "ViTSpace()"

    def decisions(self) -> list[tuple[str, tuple]]:
        names = ("depth", "embed_dim", "heads", "mlp_ratio", "patch")
        return [(n, allowed) for n, (_, allowed) in zip(names, _FIELDS, strict=True)]

    def to_choices(self, arch) -> tuple:
        return tuple(validate(arch))

    def from_choices(self, choices: Sequence) -> Arch:
        return validate(choices)

    def build(self, arch, num_classes: int = 10) -> nn.Module:
        return build_model(arch, num_classes=num_classes)

    @staticmethod
    def feature_blocks(model: nn.Module) -> tuple[list[nn.Module], int]:
        """The blocks :func:`fastntk.metrics.feature_entropy` measures: every transformer
        block, (N, tokens, dim) outputs: channel dimension -1."""
        return list(model.blocks), -1

    def encode(self, arch) -> str:
        return encode(arch)

    def decode(self, s: str) -> Arch:
        return decode(s)
