"""A ResNet search space (basic blocks, CIFAR stem), and a torchvision-free ResNet-18.

An architecture is four stages, each a width (output channels) and a depth
(number of basic blocks); stages 2-4 start with a stride-2 block. Its string
is ``WxD-WxD-WxD-WxD``, e.g. ResNet-18 is ``64x2-128x2-256x2-512x2``.

Widths are drawn from :data:`WIDTHS`, depths from :data:`DEPTHS`. The network
uses a CIFAR stem (3x3 conv, no max-pool), so 32x32 inputs reach 4x4 in the
last stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from fastntk.errors import ArchitectureError
from fastntk.spaces.base import ChoiceSpace, exact_ints, positive_int

__all__ = ["DEPTHS", "WIDTHS", "ResNet", "ResNetSpace", "build_model", "resnet18"]

WIDTHS: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
DEPTHS: tuple[int, ...] = (1, 2, 3, 4)
NUM_STAGES = 4

Arch = tuple[tuple[int, int], ...]
"""``((width, depth),) * 4``."""


def validate(arch) -> Arch:
    """Canonical tuple of ``arch`` (string or sequence of (width, depth) pairs)."""
    if isinstance(arch, str):
        return decode(arch)
    what = f"a ResNet arch is {NUM_STAGES} (width, depth) pairs"
    try:
        pairs = tuple(arch)
    except TypeError:
        raise ArchitectureError(f"{what}, got {arch!r}") from None
    stages = tuple(exact_ints(st, what) for st in pairs)
    if any(len(st) != 2 for st in stages):
        raise ArchitectureError(f"{what}, got {arch!r}")
    if len(stages) != NUM_STAGES:
        raise ArchitectureError(f"a ResNet arch has {NUM_STAGES} stages, got {len(stages)}")
    for k, (w, d) in enumerate(stages):
        if w not in WIDTHS:
            raise ArchitectureError(f"stage {k} width {w} not in {', '.join(map(str, WIDTHS))}")
        if d not in DEPTHS:
            raise ArchitectureError(f"stage {k} depth {d} not in {', '.join(map(str, DEPTHS))}")
    return stages


def encode(arch) -> str:
    return "-".join(f"{w}x{d}" for w, d in validate(arch))


def decode(s: str) -> Arch:
    if not isinstance(s, str) or not s:
        raise ArchitectureError(f"a ResNet arch must be a non-empty string, got {s!r}")
    parts = s.split("-")
    if len(parts) != NUM_STAGES:
        raise ArchitectureError(
            f"a ResNet arch is {NUM_STAGES} 'WIDTHxDEPTH' stages joined by '-' "
            f"(e.g. '64x2-128x2-256x2-512x2'), got {s!r}"
        )
    stages = []
    for p in parts:
        w, x, d = p.partition("x")
        if not x or not (w + d).isascii() or not w.isdigit() or not d.isdigit():
            raise ArchitectureError(f"ResNet stage {p!r} must be 'WIDTHxDEPTH', in {s!r}")
        stages.append((int(w), int(d)))
    return validate(stages)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, C_in: int, C_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(C_in, C_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(C_out)
        self.conv2 = nn.Conv2d(C_out, C_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(C_out)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or C_in != C_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(C_in, C_out, 1, stride=stride, bias=False), nn.BatchNorm2d(C_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu(out + short)


class ResNet(nn.Module):
    """ResNet of basic blocks with a CIFAR stem; ``x: (N, 3, H, W)`` -> logits ``(N, K)``.

    Module names follow torchvision (``conv1``, ``bn1``, ``layer1..4``, ``fc``).
    """

    def __init__(self, arch, num_classes: int = 10, stem_width: int | None = None):
        super().__init__()
        stages = validate(arch)
        num_classes = positive_int("num_classes", num_classes)
        C = stem_width or stages[0][0]
        self.conv1 = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(C)
        self.relu = nn.ReLU()
        for k, (w, d) in enumerate(stages):
            blocks = []
            for b in range(d):
                stride = 2 if (k > 0 and b == 0) else 1
                blocks.append(BasicBlock(C, w, stride))
                C = w
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(C, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def build_model(arch, num_classes: int = 10) -> ResNet:
    return ResNet(arch, num_classes=num_classes)


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18 for 32x32 inputs (11.2M parameters at width 64, 10 classes).

    ``width`` scales the four stages as (w, 2w, 4w, 8w); it must keep every
    stage width in :data:`WIDTHS` (16, 32 or 64).
    """
    return ResNet([(width * 2**k, 2) for k in range(NUM_STAGES)], num_classes=num_classes)


class ResNetSpace(ChoiceSpace):
    """The ResNet space as a :class:`fastntk.spaces.base.SearchSpace` (archs: stage tuples)."""

    name = "resnet"

    def __repr__(self) -> str:
        return "ResNetSpace()"

    def decisions(self) -> list[tuple[str, tuple]]:
        out = []
        for k in range(NUM_STAGES):
            out.append((f"stage{k}.width", WIDTHS))
            out.append((f"stage{k}.depth", DEPTHS))
        return out

    def to_choices(self, arch) -> tuple:
        return tuple(v for stage in validate(arch) for v in stage)

    def from_choices(self, choices: Sequence) -> Arch:
        c = list(choices)
        if len(c) != 2 * NUM_STAGES:
            raise ArchitectureError(
                f"a ResNet arch has {2 * NUM_STAGES} decisions (width and depth of "
                f"{NUM_STAGES} stages), got {len(c)}: {c!r}"
            )
        return validate([(c[2 * k], c[2 * k + 1]) for k in range(NUM_STAGES)])

    def build(self, arch, num_classes: int = 10) -> nn.Module:
        return build_model(arch, num_classes=num_classes)

    @staticmethod
    def feature_blocks(model: nn.Module) -> tuple[list[nn.Module], int]:
        """The blocks :func:`fastntk.metrics.feature_entropy` measures: the stem (its ReLU)
        and every basic block, (N, C, H, W) outputs: channel dimension 1."""
        stages = [getattr(model, f"layer{k + 1}") for k in range(NUM_STAGES)]
        return [model.relu, *(b for stage in stages for b in stage)], 1

    def encode(self, arch) -> str:
        return encode(arch)

    def decode(self, s: str) -> Arch:
        return decode(s)
