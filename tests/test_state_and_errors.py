"""The model is never changed, and bad input gets a clear typed error."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import zoo

import fastntk
from fastntk import errors
from fastntk.metrics import compute_metrics

# A module's hook dicts: compared by content, (handle id, hook) in order, so a hook
# replaced by another (or re-registered under a new handle) is seen, not only a count.
HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
    "_backward_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip


def snapshot(m: nn.Module):
    return {
        "params": {
            n: (p.detach().clone(), p.requires_grad, p.dtype) for n, p in m.named_parameters()
        },
        "buffers": {n: b.detach().clone() for n, b in m.named_buffers()},
        "flags": [mod.training for mod in m.modules()],
        "hooks": [
            ([list(getattr(mod, d, {}).items()) for d in HOOK_DICTS], mod._is_full_backward_hook)
            for mod in m.modules()
        ],
        "forward": [("forward" in mod.__dict__) for mod in m.modules()],
        "grads": [p.grad is None for p in m.parameters()],
    }


def assert_same(a, b):
    assert a["params"].keys() == b["params"].keys()
    for n in a["params"]:
        pa, pb = a["params"][n], b["params"][n]
        assert torch.equal(pa[0], pb[0]) and pa[1:] == pb[1:], n
    for n in a["buffers"]:
        assert torch.equal(a["buffers"][n], b["buffers"][n]), n
    assert a["flags"] == b["flags"]
    assert a["hooks"] == b["hooks"]
    assert a["forward"] == b["forward"]
    assert a["grads"] == b["grads"]


@pytest.mark.parametrize("bn", ["eval", "batch", "per_sample"])
@pytest.mark.parametrize("method", ["auto", "layerwise", "vmap", "loop", "sketch"])
@pytest.mark.parametrize("train_flag", [True, False])
def test_model_unchanged(bn, method, train_flag):
    m, x1, x2 = zoo.make("nb201")
    m.train(train_flag)
    m.cells[0].layers[0].op[1].weight.requires_grad_(False)  # a frozen parameter
    conv = m.cells[0].layers[0].op[1]  # the user's hooks of each kind: kept, the same ones
    conv.register_forward_pre_hook(lambda mod, args: None)
    conv.register_forward_hook(lambda mod, args, kwargs, out: None, with_kwargs=True)
    conv.register_full_backward_pre_hook(lambda mod, gout: None)
    conv.register_full_backward_hook(lambda mod, gin, gout: None)
    m.cells[0].register_forward_hook(lambda mod, args, out: None, always_call=True)
    before = snapshot(m)
    if method == "sketch" and bn == "batch":  # refused: the sketch needs independent samples
        with pytest.raises(errors.OptionError, match="independent"):
            fastntk.ntk(m, x1, x2, output="trace", bn=bn, method=method)
    else:
        fastntk.ntk(m, x1, x2, output="trace", bn=bn, method=method)
        fastntk.ntk(m, x1, bn=bn, method=method, dtype=torch.float64)
    assert_same(before, snapshot(m))


def _operator_products(m, x1, x2, bn):
    A = fastntk.ntk_operator(m, x1, x2, output="trace", bn=bn, chunk_size=2)
    A @ torch.ones(A.shape[1])  # streamed chunks (forward mode where samples are independent)
    A.T @ torch.ones(A.shape[0])


# The entry points besides ntk(): each run on the model of test_model_unchanged
ENTRY_POINTS = {
    "ntk_operator": _operator_products,
    "ntk_diag": lambda m, x1, x2, bn: fastntk.ntk_diag(m, x1, output="trace", bn=bn),
    "explain": lambda m, x1, x2, bn: fastntk.explain(m, x1, x2, bn=bn),
    "compute_metrics on the operator": lambda m, x1, x2, bn: compute_metrics(
        m, x1, torch.arange(len(x1)) % 3, ["lga", "trainability"], bn=bn, path="operator"),
}  # fmt: skip


@pytest.mark.parametrize("bn", ["eval", "batch", "per_sample"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_model_unchanged_by_the_other_entry_points(bn, entry):
    m, x1, x2 = zoo.make("nb201")
    m.train()
    conv = m.cells[0].layers[0].op[1]
    conv.weight.requires_grad_(False)
    conv.register_forward_hook(lambda mod, args, out: None)
    conv.register_full_backward_hook(lambda mod, gin, gout: None)
    before = snapshot(m)
    ENTRY_POINTS[entry](m, x1, x2, bn)
    assert_same(before, snapshot(m))


def test_model_unchanged_when_the_call_raises():
    m, x1, _ = zoo.make("resnet")
    m.train()
    before = snapshot(m)
    with pytest.raises(errors.OptionError):
        fastntk.ntk(m, x1, output=99, bn="batch")  # raises after the forward pass
    with pytest.raises(errors.OptionError):
        fastntk.ntk(m, x1, output=lambda out: out, bn="per_sample")
    assert_same(before, snapshot(m))


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        self.bn(x)
        raise RuntimeError("user forward failed")


def test_model_unchanged_when_forward_raises():
    m = Boom().train()
    before = snapshot(m)
    with pytest.raises(RuntimeError, match="user forward failed"):
        fastntk.ntk(m, torch.randn(3, 2, 4, 4), bn="per_sample")
    assert_same(before, snapshot(m))


@pytest.fixture
def mlp():
    return zoo.make("mlp")


def test_empty_batch(mlp):
    m, x1, _ = mlp
    with pytest.raises(errors.InputError, match="empty batch"):
        fastntk.ntk(m, x1[:0])


def test_feature_shape_mismatch(mlp):
    m, x1, _ = mlp
    with pytest.raises(errors.InputError, match="same per-sample shape"):
        fastntk.ntk(m, x1, torch.randn(3, 8))


def test_non_floating_inputs(mlp):
    m, x1, _ = mlp
    with pytest.raises(errors.InputTypeError, match="floating"):
        fastntk.ntk(m, torch.ones(3, 7, dtype=torch.uint8))
    with pytest.raises(errors.InputTypeError):
        fastntk.ntk(m, [[1.0] * 7])


def test_no_parameter_selected(mlp):
    m, x1, _ = mlp
    with pytest.raises(errors.ParameterSelectionError, match="selected no parameter"):
        fastntk.ntk(m, x1, params=lambda n, p: False)
    with pytest.raises(errors.ParameterSelectionError, match="did you mean"):
        fastntk.ntk(m, x1, params=["fc1.weigth"])
    with pytest.raises(errors.ParameterSelectionError, match="empty"):
        fastntk.ntk(m, x1, params=[])
    frozen = zoo.make("mlp")[0].requires_grad_(False)
    with pytest.raises(errors.ParameterSelectionError, match="requires grad"):
        fastntk.ntk(frozen, x1)


def test_output_index_out_of_range(mlp):
    m, x1, _ = mlp
    with pytest.raises(errors.OptionError, match="out of range"):
        fastntk.ntk(m, x1, output=3)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"bn": "train"}, "unknown bn"),
        ({"method": "jacobian"}, "unknown method"),
        ({"output": "diag"}, "unknown output"),
        ({"output": True}, "unknown output"),
        ({"chunk_size": 0}, "chunk_size's samples must be an int >= 1"),
        ({"chunk_size": True}, "chunk_size must be an int or"),
        ({"chunk_size": 2.0}, "chunk_size must be an int or"),
        ({"chunk_size": (True, 4)}, "chunk_size's samples must be an int"),
        ({"chunk_size": (2, 0)}, "chunk_size's columns must be an int >= 1"),
        ({"chunk_size": (2, 1.5)}, "chunk_size's columns must be an int"),
        ({"chunk_size": (2, 3, 4)}, "chunk_size must be an int or"),
        ({"dtype": torch.int64}, "floating-point"),
        ({"progress": "yes"}, "progress must be"),
        ({"progress": 1}, "progress must be"),
    ],
)
def test_unknown_options(mlp, kw, match):
    m, x1, _ = mlp
    with pytest.raises(errors.OptionError, match=match):
        fastntk.ntk(m, x1, **kw)
    if "chunk_size" in kw:
        with pytest.raises(errors.OptionError, match=match):
            fastntk.ntk_sketch(m, x1, sketch_dim=4, **kw)
    if "progress" in kw:
        with pytest.raises(errors.OptionError, match=match):
            fastntk.ntk_sketch(m, x1, sketch_dim=4, **kw)


def test_model_must_be_a_module(mlp):
    """A plain function gave AttributeError: 'function' object has no attribute ..."""
    _, x1, _ = mlp
    for call in (fastntk.ntk, fastntk.ntk_sketch, fastntk.explain):
        with pytest.raises(errors.InputTypeError, match="nn.Module"):
            call(lambda z: z, x1)


class NaNLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        h = self.fc1(x)
        h = h + (torch.sqrt(h - h) * 0)  # sqrt'(0) = inf: gradients through here are NaN
        return self.fc2(h)


@pytest.mark.parametrize("method", ["layerwise", "vmap", "loop"])
def test_nonfinite_kernel_names_the_layer(method):
    m = NaNLayer()
    with pytest.raises(errors.NonFiniteKernelError, match="'fc1'"):
        fastntk.ntk(m, torch.randn(4, 3), method=method)


class NaNOutOfOrder(nn.Module):
    """Declared late, mid, early (and a scale the forward uses first, declared last), run
    early -> mid -> late: the gradients are NaN from mid back to the input, late's are
    finite. The first non-finite layer in declaration order is mid; in forward order,
    early (or the root, with ``scaled``)."""

    def __init__(self, scaled=False):
        super().__init__()
        self.late = nn.Linear(3, 2)
        self.mid = nn.Linear(3, 3)
        self.early = nn.Linear(3, 3)
        self.scaled = scaled
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        if self.scaled:
            x = x * self.scale
        h = self.mid(torch.tanh(self.early(x)))
        h = h + (torch.sqrt(h - h) * 0)  # NaN gradients from here back
        return self.late(h)


@pytest.mark.parametrize("method", ["layerwise", "vmap", "loop"])
def test_nonfinite_kernel_names_the_first_layer_in_forward_order(method):
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    with pytest.raises(errors.NonFiniteKernelError, match="layer 'early' .parameter 'early.w"):
        fastntk.ntk(NaNOutOfOrder(), x, method=method)
    with pytest.raises(errors.NonFiniteKernelError, match="'<root>' .parameter 'scale'"):
        fastntk.ntk(NaNOutOfOrder(scaled=True), x, method=method)
    with pytest.raises(errors.NonFiniteKernelError, match="layer 'mid'"):
        fastntk.ntk(NaNOutOfOrder(), x, method=method, params=["late.weight", "mid.bias"])
    with pytest.raises(errors.NonFiniteKernelError, match="layer 'early'"):
        fastntk.ntk_sketch(NaNOutOfOrder(), x, sketch_dim=8)


def test_errors_share_one_hierarchy():
    for cls in (
        errors.InputError,
        errors.InputTypeError,
        errors.OptionError,
        errors.ParameterSelectionError,
        errors.NonFiniteKernelError,
    ):
        assert issubclass(cls, fastntk.FastNTKError)


@pytest.mark.parametrize("output", ["sum", "full"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_no_activation_outlives_the_call(output, chunk):
    """No reference cycle keeps a call's autograd graph alive after it returns
    (they are invisible to the garbage collector's thresholds and leaked GBs)."""
    import gc
    import weakref

    m, x1, _ = zoo.make("twice", n=5)  # rules, a fallback module and a module called twice
    refs = []
    h = m.a.register_forward_hook(lambda mod, a, out: refs.append(weakref.ref(out)))
    gc.disable()
    try:
        fastntk.ntk(m, x1, output=output, chunk_size=chunk)
        fastntk.explain(m, x1)
        assert refs and all(r() is None for r in refs)
    finally:
        gc.enable()
        h.remove()


def test_tune_allocator_in_its_own_process():
    """tune_allocator changes glibc's settings of the process it runs in (here a child, so
    the test process stays as it was); kernels are the same afterwards."""
    import platform
    import subprocess
    import sys

    code = (
        "import torch, fastntk\n"
        "from fastntk.spaces import nb201\n"
        "torch.manual_seed(0)\n"
        "m = nb201.build_model('|nor_conv_3x3~0|+|skip_connect~0|none~1|+|none~0|none~1|avg_pool_3x3~2|')\n"
        "x = torch.randn(6, 3, 32, 32)\n"
        "a = fastntk.ntk(m, x)\n"
        "assert not fastntk.env()['allocator_tuned']\n"
        "r = fastntk.tune_allocator()\n"
        "print(r['applied'], fastntk.env()['allocator_tuned'])\n"
        "assert torch.equal(a, fastntk.ntk(m, x))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expect = "True True" if platform.libc_ver()[0] == "glibc" else "False False"
    assert out.stdout.split("\n")[0] == expect


def test_tune_allocator_off_glibc_changes_nothing(monkeypatch):
    import platform

    from fastntk import _env

    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    r = _env.tune_allocator()
    assert r["applied"] is False and "not glibc" in r["reason"]


def test_command_line_tuning_is_opt_in(monkeypatch):
    from fastntk import _env, cli

    monkeypatch.delenv("FASTNTK_TUNE_ALLOCATOR", raising=False)
    assert cli.tune_own_process() is None
    monkeypatch.setenv("FASTNTK_TUNE_ALLOCATOR", "0")
    assert cli.tune_own_process() is None
    calls = []
    monkeypatch.setattr(_env, "tune_allocator", lambda *a: calls.append(a) or {"applied": True})
    monkeypatch.setenv("FASTNTK_TUNE_ALLOCATOR", "1")
    assert cli.tune_own_process() == {"applied": True} and calls


@pytest.mark.parametrize(
    "triton_version,numpy_version,broken",
    [
        ("3.6.0", "2.4.6", True),
        ("3.5.1", "2.4.0", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.0", "2.4.6", False),
        ("3.9.0+git1a2b", "2.5.0", False),
    ],
)
def test_triton_interpreter_numpy_incompatibility(
    monkeypatch, triton_version, numpy_version, broken
):
    """Triton <= 3.6's interpreter with NumPy >= 2.4 is refused by name, not by an InterpreterError."""
    import numpy

    from fastntk import kernels
    from fastntk._env import env

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(kernels, "TRITON_VERSION", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reason = kernels.why_not("cpu")
    if broken:
        assert reason is not None and "numpy<2.4" in reason and triton_version in reason
        e = env()
        assert e["triton_runnable"] is False and e["triton_error"] == reason
        with pytest.raises(errors.UnsupportedError, match="numpy<2.4"):
            fastntk.ntk(torch.nn.Linear(3, 2), torch.randn(4, 3), method="triton")
    else:
        assert reason is None
        assert env()["triton_runnable"] is True


class _SharedBlock(nn.Module):
    """One block registered under two names (applied twice) and a weight tied across
    modules: torch.func's tie_weights swapped the aliased slot twice and left fastntk's
    private copies in the model after a successful call."""

    def __init__(self):
        super().__init__()
        blk = nn.Linear(3, 3)
        self.inp, self.out = nn.Linear(2, 3), nn.Linear(3, 3)
        self.layers = nn.ModuleList([blk, blk])
        self.tied = nn.Linear(3, 3, bias=False)
        self.tied.weight = blk.weight

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.out(h) + self.tied(h)


@pytest.mark.parametrize("method", ["auto", "layerwise", "vmap", "loop", "sketch"])
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_aliased_submodule_keeps_the_users_parameters(method, dtype):
    from reference import full_kernel, reduce, rel_err

    torch.manual_seed(0)
    m = _SharedBlock()
    before = {n: p for n, p in m.named_parameters(remove_duplicate=False)}
    w = m.layers[0].weight
    w.grad = torch.ones_like(w)
    kw = {"sketch_dim": 16} if method == "sketch" else {}
    x = torch.randn(4, 2)
    first = fastntk.ntk(m, x, method=method, dtype=dtype, **kw)
    after = dict(m.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(after[n] is p for n, p in before.items())  # the same Parameter objects
    assert m.tied.weight is m.layers[1].weight and torch.equal(w.grad, torch.ones_like(w))
    assert torch.equal(fastntk.ntk(m, x, method=method, dtype=dtype, **kw), first)
    if method != "sketch":
        ref = reduce(full_kernel(m, x.double()), "sum")
        assert rel_err(first, ref) <= (1e-10 if dtype else 1e-5)


def test_train_override_side_effects_do_not_outlive_the_call():
    class Frozen(nn.Module):  # a train() override that freezes a backbone in eval mode
        def __init__(self):
            super().__init__()
            self.backbone, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
            self.flag = True

        def train(self, mode=True):
            super().train(mode)
            self.backbone.requires_grad_(mode)
            self.flag = mode
            return self

        def forward(self, x):
            return self.head(torch.tanh(self.backbone(x)))

    m = Frozen()
    snap = snapshot(m)
    fastntk.ntk(m, torch.randn(3, 3))
    assert_same(snap, snapshot(m))
    assert m.flag is True


def test_global_module_backward_hooks_are_suspended():
    fired = []
    h = nn.modules.module.register_module_full_backward_hook(lambda *a: fired.append(1))
    try:
        m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        x = torch.randn(3, 3)
        for method in ("auto", "vmap", "loop"):
            fastntk.ntk(m, x, method=method)
        assert fired == []
        m(x).sum().backward()  # the user's own backward still sees the hook
        assert fired
    finally:
        h.remove()


def test_sketch_nan_diagnosis_runs_in_the_calls_modes():
    class NaNs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.drop, self.out = nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.drop(self.fc(x) * float("inf")))

    m = NaNs().train()
    fired = []
    m.fc.register_full_backward_hook(lambda *a: fired.append(1))
    x = torch.randn(4, 3)
    state = torch.random.get_rng_state()
    with pytest.raises(errors.NonFiniteKernelError):
        fastntk.ntk_sketch(m, x, sketch_dim=8)
    assert torch.equal(torch.random.get_rng_state(), state) and fired == [] and m.training


def test_two_threads_on_one_model_leave_it_as_it_was():
    import threading

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.1), nn.Tanh(), nn.Linear(8, 2)).train()
    m[0].register_full_backward_hook(lambda *a: None)
    snap = snapshot(m)
    x = torch.randn(16, 3)
    ref = fastntk.ntk(m, x)
    out, errs = [], []

    def work():
        try:
            for _ in range(3):
                out.append(fastntk.ntk(m, x, chunk_size=4))
        except Exception as e:  # noqa: BLE001 - reported below
            errs.append(e)

    ts = [threading.Thread(target=work) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs and len(out) == 6
    assert all(torch.allclose(k, ref, rtol=1e-5, atol=1e-6) for k in out)
    assert_same(snap, snapshot(m))


def test_kernel_evolution_keeps_the_users_hooks_to_the_user():
    """The trained copy (a deepcopy) carried the user's backward hooks, which then ran on
    every training step of the copy."""
    from fastntk import metrics

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    fired = []
    m[0].register_full_backward_hook(lambda *a: fired.append(1))
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    snap = snapshot(m)
    state = torch.random.get_rng_state()
    ev = metrics.kernel_evolution(m, x, y, times=(2,), unit="step", batch_size=4)
    assert len(ev.kernels) == 2 and fired == []
    assert torch.equal(torch.random.get_rng_state(), state)
    assert_same(snap, snapshot(m))


def test_parametrize_cache_is_not_shared_with_the_call():
    """Inside parametrize.cached(), a weight the user's forward had cached was used by the
    call (the kernel w.r.t. the parametrization's originals came out wrong), and the
    call's weights, made from fastntk's copies, were left for the user's next forward."""
    import torch.nn.utils.parametrize as P
    from torch.nn.utils import parametrizations

    def make():
        torch.manual_seed(0)
        lin = parametrizations.weight_norm(nn.Linear(3, 4))
        return nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 2))

    x = torch.randn(5, 3)
    ref = fastntk.ntk(make(), x)
    m = make()
    with P.cached():
        m(x)
        assert torch.equal(fastntk.ntk(m, x), ref)
        before = dict(P._cache)
        m(x).sum().backward()
    assert P._cache_enabled == 0 and all(v.requires_grad for v in before.values())
    assert m[0].parametrizations.weight.original1.grad.abs().sum() > 0


def test_derived_weight_attributes_are_restored():
    """prune and the legacy weight_norm write the derived weight as a plain attribute in a
    forward pre-hook: the call left one computed from fastntk's copies."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    pruned = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    legacy = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2))
    for m in (pruned, legacy):
        w = m[0].weight
        fastntk.ntk(m, torch.randn(4, 3), dtype=torch.float64)
        assert m[0].weight is w and m[0].weight.dtype == torch.float32


def test_process_wide_state_changed_by_another_thread_during_a_call():
    """Another thread that leaves parametrize.cached() or removes a global backward hook
    while a call runs: its change stands afterwards (the call restored snapshots: the
    cache counter ended at 1 with nobody inside cached(), the removed hook came back)."""
    import threading

    import torch.nn.utils.parametrize as P
    from torch.nn.modules import module as M

    inside, go = threading.Event(), threading.Event()

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            if threading.current_thread().name == "call" and not inside.is_set():
                inside.set()
                go.wait(30)
            return self.lin(x)

    def call():
        fastntk.ntk(Slow(), torch.randn(4, 3))

    cm = P.cached()
    cm.__enter__()
    t = threading.Thread(target=call, name="call")
    t.start()
    assert inside.wait(30)
    cm.__exit__(None, None, None)  # this thread leaves cached() during the call
    go.set()
    t.join()
    assert P._cache_enabled == 0
    inside.clear()
    go.clear()
    h = M.register_module_full_backward_hook(lambda *a: None)
    t = threading.Thread(target=call, name="call")
    t.start()
    assert inside.wait(30)
    h.remove()  # removed during the call
    go.set()
    t.join()
    assert len(M._global_backward_hooks) == 0


def test_two_threads_on_models_sharing_a_submodule_leave_it_as_it_was():
    """Calls on two models that share a block (weight-sharing supernets scored in
    threads) took different locks: the second call saved the first one's temporary modes,
    hooks and private parameter copies as the user's and left them on the block."""
    import threading
    import time

    torch.manual_seed(0)
    blk = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.1), nn.Tanh()).train()
    blk[0].register_full_backward_hook(lambda *a: None)
    m1, m2 = nn.Sequential(blk, nn.Linear(8, 2)), nn.Sequential(blk, nn.Linear(8, 3))
    weight = blk[0].weight
    x = torch.randn(6, 3)
    refs = [fastntk.ntk(m1, x), fastntk.ntk(m2, x)]
    inside, go_first, go_second = threading.Event(), threading.Event(), threading.Event()

    def pause(event, gate):
        def hook(*args):
            if not event.is_set():
                event.set()
                gate.wait(10)

        return hook

    m1[1].register_forward_hook(pause(inside, go_first))
    m2[1].register_forward_hook(pause(threading.Event(), go_second))
    snap1, snap2 = snapshot(m1), snapshot(m2)
    out, errs = {}, []

    def work(i, m):
        try:
            out[i] = fastntk.ntk(m, x)
        except Exception as e:  # noqa: BLE001 - reported below
            errs.append(e)

    a = threading.Thread(target=work, args=(0, m1))
    b = threading.Thread(target=work, args=(1, m2))
    a.start()
    assert inside.wait(10)
    b.start()  # with one lock per model it ran inside the first call
    time.sleep(0.3)
    go_first.set()
    a.join(10)
    go_second.set()  # the second call, if it started, finishes last
    b.join(10)
    assert not errs and set(out) == {0, 1}
    for i in (0, 1):
        assert torch.allclose(out[i], refs[i], rtol=1e-5, atol=1e-6)
    assert blk[0].weight is weight and blk.training
    assert_same(snap1, snapshot(m1))
    assert_same(snap2, snapshot(m2))


def test_chunk_size_forms(mlp):
    """An int (numpy ints too), or (samples, columns) with columns None for the default."""
    import numpy as np

    m, x1, _ = mlp
    ref = fastntk.ntk(m, x1, dtype=torch.float64)
    for chunk in (2, np.int64(2), (2, None), (np.int32(2), 3), (1, 1)):
        assert torch.allclose(fastntk.ntk(m, x1, chunk_size=chunk, dtype=torch.float64), ref,
                              rtol=1e-12, atol=1e-12), chunk  # fmt: skip


@pytest.mark.parametrize("method", ["auto", "layerwise", "loop", "vmap", "sketch"])
def test_forward_that_edits_its_weight_in_place_leaves_the_users_weight(method):
    """The call's parameter copies were detached views sharing the user's storage, so a
    forward clamping its weight in place (under no_grad) clipped the user's parameter
    (helper-26); the copies own their storage now. Every method computes the kernel of the
    clamped copy (the clamp runs before the weight is used: no forward runs between a
    chunk's forward and its backward, so no saved tensor changes)."""

    class Clipped(nn.Linear):
        def forward(self, x):
            with torch.no_grad():
                self.weight.clamp_(-0.1, 0.1)
            return super().forward(x)

    torch.manual_seed(0)
    m = nn.Sequential(Clipped(4, 3), nn.Tanh(), nn.Linear(3, 2))
    w0, v0 = m[0].weight.detach().clone(), m[0].weight._version
    x = torch.randn(5, 4)
    ref = fastntk.ntk(m, x, method="loop", dtype=torch.float64)
    for chunk in (None, 2):
        theta = fastntk.ntk(m, x, method=method, chunk_size=chunk, dtype=torch.float64)
        assert torch.allclose(theta, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(m[0].weight, w0) and m[0].weight._version == v0


def test_torchscript_module_is_refused_with_advice():
    m = torch.jit.script(nn.Sequential(nn.Linear(3, 2)))
    for call in (lambda: fastntk.ntk(m, torch.randn(4, 3)), lambda: fastntk.explain(m, torch.randn(4, 3)),
                 lambda: fastntk.ntk_sketch(m, torch.randn(4, 3), sketch_dim=4)):  # fmt: skip
        with pytest.raises(errors.UnsupportedError, match="TorchScript"):
            call()


def test_ctrl_c_during_a_restore_is_delivered_after_it():
    """A KeyboardInterrupt in the middle of model_state's restore left every module in
    eval mode or its backward hooks gone (helper-26, with a SIGALRM handler); Ctrl-C is
    now held back while the user's state is put back, and delivered afterwards."""
    import os
    import signal
    import time

    from fastntk._model import state

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with state._sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (the handler has run by now)
            reached.append(True)
    assert reached and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    m[1].register_full_backward_hook(lambda *a: None)
    params = {n: p for n, p in m.named_parameters()}
    real = state._restore_model

    def interrupted(*a):  # Ctrl-C arrives as the restore starts
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        real(*a)

    state._restore_model = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            fastntk.ntk(m, torch.randn(5, 3))
    finally:
        state._restore_model = real
    assert all(mm.training for mm in m.modules()) and len(m[1]._backward_hooks) == 1
    assert all(p is params[n] for n, p in m.named_parameters())


def test_interrupted_swap_out_leaves_no_copies_in_the_model(monkeypatch):
    """torch.func's functional_call does not undo a partial swap: interrupted while it puts
    the user's tensors back, the model kept fastntk's copies (plain tensors, other ids);
    model_state puts every (module, attribute) slot back as it was."""
    from fastntk._model import copies

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = {n: p for n, p in m.named_parameters()}
    real = copies.functional_call

    def partial(module, slots, *a, **k):
        real(module, slots, *a, **k)
        module[0]._parameters["weight"] = slots["0.weight"]  # as if interrupted mid-restore
        raise KeyboardInterrupt

    monkeypatch.setattr(copies, "functional_call", partial)
    with pytest.raises(KeyboardInterrupt):
        fastntk.ntk(m, torch.randn(5, 3))
    assert all(p is params[n] for n, p in m.named_parameters())
    assert all(type(p) is nn.Parameter for p in m.parameters())


def test_ctrl_c_deferral_leaves_a_foreign_sigint_handler_alone(monkeypatch):
    """A SIGINT handler installed outside Python (an embedding application) reads as None
    and cannot be put back: no deferral then (helper-27: a TypeError in the restore, and
    fastntk's handler left installed)."""
    import signal

    from fastntk._model import state

    monkeypatch.setattr(signal, "getsignal", lambda sig: None)
    installed = []
    monkeypatch.setattr(signal, "signal", lambda sig, h: installed.append(h))
    with state._sigint_deferred():
        pass
    assert installed == []


class _ModeProperty(nn.Module):
    """A module whose ``training`` is a property over its own storage (torch.compile's
    OptimizedModule has one) and whose forward depends on it."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    @property
    def training(self):
        return self.__dict__.get("_mode", True)

    @training.setter
    def training(self, mode):
        self.__dict__["_mode"] = mode

    def forward(self, x):
        return self.inner(x) * (2.0 if self.training else 1.0)


def test_a_training_property_is_set_and_restored_through_it():
    """The flags are written past nn.Module.__setattr__ only where they are plain
    attributes: a ``training`` property gets the engine's eval mode through its setter (the
    kernel is the eval-mode function's), and holds the user's mode again afterwards."""
    from reference import reference_ntk, rel_err

    torch.manual_seed(0)
    m = _ModeProperty().double().train()
    x = torch.randn(5, 3, dtype=torch.float64)
    got = fastntk.ntk(m, x)
    m.eval()
    want = reference_ntk(m, x)  # (the oracle runs an eval-mode copy)
    m.train()
    assert rel_err(got, want) < 1e-10
    assert m.training and "training" not in vars(m)
