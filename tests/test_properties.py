"""Property tests: random layer shapes, every rule against the float64 oracle."""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import TOL, full_kernel, reduce, rel_err

import fastntk

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def conv_case(draw):
    nd = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    k = draw(st.integers(1, 4))
    dil = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 3))
    span = dil * (k - 1) + 1
    size = draw(st.integers(span, span + 5 if nd < 3 else span + 2))
    same = stride == 1 and draw(st.booleans())
    pad = "same" if same else draw(st.integers(0, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "circular"])) if pad != 0 else "zeros"
    if mode != "zeros" and pad != "same" and pad >= size:
        mode = "zeros"
    if mode == "reflect" and pad == "same" and span // 2 >= size:
        mode = "zeros"
    bias = draw(st.booleans())
    n = draw(st.integers(1, 4))
    return nd, cin, cout, k, stride, pad, dil, groups, mode, bias, size, n


@SETTINGS
@given(conv_case(), st.sampled_from(["sum", "full"]))
def test_random_convolutions(case, output):
    nd, cin, cout, k, stride, pad, dil, groups, mode, bias, size, n = case
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    torch.manual_seed(0)
    conv = conv_cls(
        cin,
        cout,
        k,
        stride=stride,
        padding=pad,
        dilation=dil,
        groups=groups,
        bias=bias,
        padding_mode=mode,
    )
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(n, cin, *([size] * nd), generator=torch.Generator().manual_seed(1))
    model(x)  # materialise the lazy layer
    theta = fastntk.ntk(model, x, output=output, dtype=torch.float64)
    assert rel_err(theta, reduce(full_kernel(model, x), output)) <= TOL[torch.float64]


@SETTINGS
@given(
    st.integers(1, 5),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(0, 3),
    st.booleans(),
    st.sampled_from(["trace", "full", 0]),
)
def test_random_linear_and_tokens(n, d_in, d_out, tokens, bias, output):
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out, bias=bias)
    model = nn.Sequential(lin, nn.LayerNorm(d_out), nn.Tanh(), nn.Linear(d_out, 3))
    shape = (n, d_in) if tokens == 0 else (n, tokens, d_in)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    if tokens:
        model = nn.Sequential(model, _Mean())
    theta = fastntk.ntk(model, x, output=output, dtype=torch.float64)
    assert rel_err(theta, reduce(full_kernel(model, x), output)) <= TOL[torch.float64]


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean(1)


@SETTINGS
@given(st.integers(1, 4), st.sampled_from([1, 2, 4]), st.integers(2, 6), st.booleans())
def test_random_norm_layers(n, groups, spatial, affine_bn):
    torch.manual_seed(0)
    c = 4
    model = nn.Sequential(
        nn.Conv2d(2, c, 3, padding=1),
        nn.GroupNorm(groups, c),
        nn.Tanh(),
        nn.BatchNorm2d(c, affine=affine_bn),
        nn.InstanceNorm2d(c, affine=True),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(c * spatial * spatial, 2),
    )
    with torch.no_grad():
        model[3].running_mean.uniform_(-0.5, 0.5)
        model[3].running_var.uniform_(0.5, 2.0)
    x = torch.randn(n, 2, spatial, spatial, generator=torch.Generator().manual_seed(3))
    for bn in ("eval", "per_sample"):
        theta = fastntk.ntk(model, x, output="trace", bn=bn, dtype=torch.float64)
        assert rel_err(theta, reduce(full_kernel(model, x, bn=bn), "trace")) <= TOL[torch.float64]
