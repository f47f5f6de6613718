"""NAS-Bench-201's networks: the five ops, the cell, and ``TinyNetwork``.

:func:`build_model` returns a network whose ``state_dict`` matches the official
NAS-Bench-201 ``TinyNetwork`` key for key, shape for shape. No op works in place,
so the networks run under ``torch.func`` transforms.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastntk.errors import ArchitectureError
from fastntk.spaces.base import positive_int
from fastntk.spaces.nb201.grammar import EDGES, NUM_NODES, OPS, ArchLike, as_arch, parse_arch

__all__ = [
    "AvgPool3x3",
    "Identity",
    "InferCell",
    "Pooling",
    "ReLUConvBN",
    "ResNetBasicblock",
    "TinyNetwork",
    "Zero",
    "build_model",
    "make_op",
]


class ReLUConvBN(nn.Module):
    """``op`` = Sequential(ReLU, Conv2d(bias=False), BatchNorm2d(affine, running stats))."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int = 1
    ):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                C_in,
                C_out,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                bias=False,
            ),
            nn.BatchNorm2d(C_out, affine=True, track_running_stats=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Zero(nn.Module):
    """The ``none`` op: zeros of the output shape (``x.mul(0.)`` as in the official code)."""

    def __init__(self, C_in: int, C_out: int, stride: int):
        super().__init__()
        self.C_in = C_in
        self.C_out = C_out
        self.stride = stride
        self.is_zero = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.C_in == self.C_out:
            if self.stride == 1:
                return x.mul(0.0)
            return x[:, :, :: self.stride, :: self.stride].mul(0.0)
        # Channel change: slice/expand keeps it vmap-friendly and out of place.
        y = x[:, :1, :: self.stride, :: self.stride].mul(0.0)
        return y.expand(-1, self.C_out, -1, -1)


class Identity(nn.Module):
    """The ``skip_connect`` op inside a cell (stride 1, C_in == C_out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class AvgPool3x3(nn.AvgPool2d):
    """``nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)``, computed on the CPU
    as a depthwise 3x3 box filter divided by the number of in-bounds positions.

    The same function (only the summation order, i.e. float rounding, differs), with the
    same attributes and no parameters, so state dicts and ``isinstance`` checks are
    unaffected. PyTorch's CPU ``avg_pool2d`` is slow for this shape: on the 2-core AMD
    EPYC (float32, N=32, best of 3), forward 3.09 ms vs 0.43 ms at 16x32x32 and 0.54 vs
    0.15 ms at 64x8x8, backward 3.24 vs 0.50 ms and 0.70 vs 0.15 ms
    (``python bench/bench_engine_choices.py pool``, bench/results/engine_choices_cpu.md).
    On GPUs the built-in op is used (not measured there).
    """

    def __init__(self, stride: int = 1):
        super().__init__(3, stride=stride, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.device.type != "cpu":
            return super().forward(x)
        box = x.new_ones(1, 1, 3, 3)
        sums = F.conv2d(
            x, box.expand(x.shape[1], 1, 3, 3), stride=self.stride, padding=1, groups=x.shape[1]
        )
        count = F.conv2d(x.new_ones(1, 1, *x.shape[2:]), box, stride=self.stride, padding=1)
        return sums / count


class Pooling(nn.Module):
    """The ``avg_pool_3x3`` op: ``op`` = AvgPool2d(3, stride, 1, count_include_pad=False).

    ``preprocess`` is ``None`` when ``C_in == C_out`` (always, inside cells), else
    a 1x1 ReLUConvBN as in the official ``POOLING``.
    """

    def __init__(self, C_in: int, C_out: int, stride: int):
        super().__init__()
        self.preprocess = None if C_in == C_out else ReLUConvBN(C_in, C_out, 1, 1, 0)
        self.op = AvgPool3x3(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preprocess is not None:
            x = self.preprocess(x)
        return self.op(x)


def make_op(name: str, C_in: int, C_out: int, stride: int) -> nn.Module:
    """The module of op ``name`` (one of :data:`OPS`) on one edge of a cell."""
    if name == "none":
        return Zero(C_in, C_out, stride)
    if name == "skip_connect":
        if stride != 1 or C_in != C_out:
            raise ArchitectureError("skip_connect with a stride or channel change is not in NB201")
        return Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(C_in, C_out, 1, stride, 0)
    if name == "nor_conv_3x3":
        return ReLUConvBN(C_in, C_out, 3, stride, 1)
    if name == "avg_pool_3x3":
        return Pooling(C_in, C_out, stride)
    raise ArchitectureError(f"unknown op {name!r}; allowed ops: {', '.join(OPS)}")


class InferCell(nn.Module):
    """A searched cell: ``layers`` holds the 6 edge ops in edge order; output = node 3."""

    def __init__(self, arch: str, C_in: int, C_out: int, stride: int = 1):
        super().__init__()
        ops = parse_arch(arch)
        self.arch = arch
        self.layers = nn.ModuleList()
        for (_j, k), op in zip(EDGES, ops, strict=True):
            if k == 0:
                self.layers.append(make_op(op, C_in, C_out, stride))
            else:
                self.layers.append(make_op(op, C_out, C_out, 1))
        self.in_dim = C_in
        self.out_dim = C_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        e = 0
        for j in range(1, NUM_NODES):
            acc = None
            for k in range(j):
                y = self.layers[e](nodes[k])
                e += 1
                acc = y if acc is None else acc + y
            nodes.append(acc)
        return nodes[-1]

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, C_in={self.in_dim}, C_out={self.out_dim}"


class ResNetBasicblock(nn.Module):
    """Reduction block: ``conv_b(conv_a(x)) + downsample(x)`` (stride 2)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 2):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"invalid stride {stride}")
        self.conv_a = ReLUConvBN(inplanes, planes, 3, stride, 1)
        self.conv_b = ReLUConvBN(planes, planes, 3, 1, 1)
        if stride == 2:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=1, padding=0, bias=False),
            )
        elif inplanes != planes:
            self.downsample = ReLUConvBN(inplanes, planes, 1, 1, 0)
        else:
            self.downsample = None
        self.in_dim = inplanes
        self.out_dim = planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_b(self.conv_a(x))
        residual = x if self.downsample is None else self.downsample(x)
        return residual + out


class TinyNetwork(nn.Module):
    """NAS-Bench-201's ``TinyNetwork`` (forward returns ``(features, logits)``).

    Args:
        arch: the cell's encoding, read by ``cell``.
        C: channels of the first stage (the stages have C, 2C, 4C).
        N: normal cells per stage.
        num_classes: outputs of the classifier.
        cell: the class of the normal cells: :class:`InferCell` (an arch string) or
            :class:`fastntk.spaces.nb201.supernet.SuperCell` (a supernet string).
    """

    def __init__(
        self,
        arch: str,
        C: int = 16,
        N: int = 5,
        num_classes: int = 10,
        cell: type[InferCell] = InferCell,
    ):
        super().__init__()
        self.arch = arch
        self._C = C
        self._layerN = N
        self.stem = nn.Sequential(
            nn.Conv2d(3, C, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(C)
        )
        channels = [C] * N + [C * 2] + [C * 2] * N + [C * 4] + [C * 4] * N
        reductions = [False] * N + [True] + [False] * N + [True] + [False] * N
        C_prev = C
        self.cells = nn.ModuleList()
        for C_curr, reduction in zip(channels, reductions, strict=True):
            if reduction:
                self.cells.append(ResNetBasicblock(C_prev, C_curr, 2))
            else:
                self.cells.append(cell(arch, C_prev, C_curr, 1))
            C_prev = C_curr
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.stem(x)
        for cell in self.cells:
            feature = cell(feature)
        out = self.lastact(feature)
        out = self.global_pooling(out)
        out = out.flatten(1)
        logits = self.classifier(out)
        return out, logits


def build_model(arch: ArchLike, num_classes: int = 10, C: int = 16, N: int = 5) -> TinyNetwork:
    """Untrained NAS-Bench-201 network of ``arch`` (default PyTorch initialisation).

    The module tree, parameter and buffer names and shapes equal those of the
    official ``TinyNetwork(C, N, genotype, num_classes)``, so official
    checkpoints load with ``load_state_dict(strict=True)``. ``forward`` returns
    ``(features, logits)`` with ``features`` the pooled ``(B, 4C)`` vector.
    No op works in place, so the model runs under ``torch.func`` transforms.
    """
    arch = as_arch(arch)
    num_classes = positive_int("num_classes", num_classes)  # (numpy integers too, not bools)
    C, N = positive_int("C", C), positive_int("N", N, minimum=0)
    return TinyNetwork(arch, C=C, N=N, num_classes=num_classes)
