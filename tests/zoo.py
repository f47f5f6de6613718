"""Small models covering every rule and fallback; inputs made with fixed seeds."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(7, 9)
        self.fc2 = nn.Linear(9, 5, bias=False)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class ConvZoo(nn.Module):
    """Every Conv2d variant: stride, padding numbers / "same" / reflect, dilation, groups, depthwise."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding="same", bias=False)
        self.c3 = nn.Conv2d(4, 6, 5, padding=4, dilation=2, groups=2)
        self.c4 = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # depthwise
        self.c5 = nn.Conv2d(6, 4, (1, 3), stride=(1, 2), padding=(0, 1), padding_mode="reflect")
        self.c6 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 4 * 2, 3)

    def forward(self, x):
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x))
        x = torch.tanh(self.c3(x))
        x = torch.tanh(self.c4(x))
        x = torch.tanh(self.c5(x))
        x = self.c6(x)
        return self.fc(x.flatten(1))


class Conv1d3d(nn.Module):
    """Conv1d and Conv3d (input (N, 2, 4, 4, 4)), GroupNorm, InstanceNorm."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 1), dilation=(1, 1, 2), bias=True)
        self.gn = nn.GroupNorm(2, 4)
        self.c1 = nn.Conv1d(4, 3, 3, padding=2, dilation=2, groups=1)
        self.inorm = nn.InstanceNorm1d(3, affine=True)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.tanh(
            self.gn(self.c3(x))
        )  # (N, 4, 4, 2, 2) for dilation 2 in w: w_out=2? see forward
        x = x.flatten(2)  # (N, 4, L)
        x = torch.tanh(self.inorm(self.c1(x)))
        return self.fc(x.mean(2))


class SmallResNet(nn.Module):
    """Conv-BN-ReLU(inplace) basic blocks with a 1x1 downsample."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        )
        self.conv_a = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(2 * c)
        self.conv_b = nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(2 * c)
        self.down = nn.Sequential(
            nn.Conv2d(c, 2 * c, 1, stride=2, bias=False), nn.BatchNorm2d(2 * c)
        )
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2 * c, 4)

    def forward(self, x):
        x = self.stem(x)
        out = self.relu(self.bn_a(self.conv_a(x)))
        out = self.bn_b(self.conv_b(out))
        out += self.down(x)
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


class TinyViT(nn.Module):
    """Patch conv, cls token + positional embedding (raw parameters), LayerNorm, MHA, MLP."""

    def __init__(self, d=8, heads=2, patch=4, img=8, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        n = (img // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.1)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        h = self.ln1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.ln2(t))
        return self.head(t[:, 0])


class TiedLM(nn.Module):
    """Embedding tied to the output projection; integer token inputs."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.ln = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        h = self.ln(self.emb(idx)).mean(1)
        return self.out(torch.tanh(self.proj(h)))


class CalledTwice(nn.Module):
    """One Linear applied twice, a frozen layer, and a custom module with a raw parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5)
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.scale = Scale(5)
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.a(h))  # same module, second call
        h = self.scale(self.frozen(h))
        return self.b(h)


class Scale(nn.Module):
    """A user layer with no registered rule: exercises the per-module torch.func fallback."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return torch.sin(x * self.w) + x


class OutsideUse(nn.Module):
    """A Linear's weight also used directly in the parent's forward (needs the model fallback)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = torch.tanh(F.linear(h, self.fc.weight))
        return self.head(h)


def nb201_small():
    from fastntk.spaces.nb201 import build_model

    arch = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|nor_conv_3x3~1|avg_pool_3x3~2|"
    return build_model(arch, num_classes=4, C=2, N=1)


def make(name: str, n: int = 4, seed: int = 0):
    """(model, x1, x2) with fixed seeds; BatchNorm running statistics made non-trivial."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "mlp":
        m, shape = MLP(), (7,)
    elif name == "convzoo":
        m, shape = ConvZoo(), (3, 8, 8)
    elif name == "conv1d3d":
        m, shape = Conv1d3d(), (2, 4, 4, 4)
    elif name == "resnet":
        m, shape = SmallResNet(), (3, 8, 8)
    elif name == "vit":
        m, shape = TinyViT(), (3, 8, 8)
    elif name == "tied":
        m = TiedLM()
        x1 = torch.randint(0, 11, (n, 5), generator=g)
        x2 = torch.randint(0, 11, (n + 1, 5), generator=g)
        x1[0, 0] = 0  # a padding token
        return m, x1, x2
    elif name == "twice":
        m, shape = CalledTwice(), (5,)
    elif name == "outside":
        m, shape = OutsideUse(), (4,)
    elif name == "nb201":
        m, shape = nb201_small(), (3, 8, 8)
    else:
        raise KeyError(name)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.3, 0.3, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.2, 0.2, generator=g)
    x1 = torch.randn((n, *shape), generator=g)
    x2 = torch.randn((n + 1, *shape), generator=g)
    return m, x1, x2


ZOO = ["mlp", "convzoo", "conv1d3d", "resnet", "vit", "tied", "twice", "outside", "nb201"]
BN_ZOO = ["resnet", "nb201"]
