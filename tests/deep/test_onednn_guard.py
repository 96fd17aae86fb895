"""The guard against oneDNN's AVX2 1x1-strided weight-gradient bug (deep.models.staged).

The engine-level test reads oneDNN's own log (ONEDNN_VERBOSE=1) of a real fine-tuning
run: no weight gradient of a 1x1, strided convolution with input channels that are not
a multiple of 8 may run on a channels-last (`acdb`) source, on any ISA. That is
deterministic (the kernels are chosen by layout and shape), unlike waiting for the heap
corruption to be noticed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from deep.models.staged import channels_last_unsafe, guard_channels_last

ROOT = Path(__file__).resolve().parents[2]


def _cpu_has_avx2() -> bool:
    try:
        return " avx2 " in f" {Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    except OSError:
        return False


@pytest.mark.parametrize("cin, kernel, stride, groups, unsafe", [
    (4, 1, 2, 1, True), (7, 1, 2, 1, True), (2, 1, 3, 1, True), (12, 1, 2, 1, True),
    (8, 1, 2, 1, False), (16, 1, 2, 1, False), (4, 1, 1, 1, False), (4, 3, 2, 1, False),
    (16, 1, 2, 4, True), (32, 1, 2, 4, False),
    # a stride other than 1 in one direction only: still strided (`any`, not `all`)
    (4, 1, (1, 2), 1, True), (4, 1, (2, 1), 1, True),
])
def test_which_convolutions_are_guarded(cin, kernel, stride, groups, unsafe):
    conv = nn.Conv2d(cin, 8 * groups, kernel, stride=stride, groups=groups)
    assert channels_last_unsafe(conv) is unsafe


def test_guard_changes_layout_only_not_numbers():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 1, stride=2)
    x = torch.randn(8, 4, 10, 10)
    ref = conv(x)
    ref.square().sum().backward()
    ref_grad = conv.weight.grad.clone()
    assert guard_channels_last(nn.Sequential(conv)) == 1
    assert guard_channels_last(conv) == 1  # idempotent: one hook
    assert len(conv._forward_pre_hooks) == 1
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    conv.weight.grad = None
    out = conv(x.contiguous(memory_format=torch.channels_last))
    out.square().sum().backward()
    assert seen == [True]  # the convolution itself saw NCHW
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.weight.grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_a_layout_change_after_guarding_is_undone_before_the_convolution_runs():
    """guard, then `model.to(memory_format=torch.channels_last)` (a caller's loop): the
    weight gets channels-last strides again, and the hook restores plain ones."""
    model = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False))
    guard_channels_last(model)
    model.to(memory_format=torch.channels_last)
    assert model[0].weight.stride() == (4, 1, 4, 4)
    model(torch.randn(2, 4, 6, 6)).sum().backward()
    assert model[0].weight.stride() == (4, 1, 1, 1) and model[0].weight.grad is not None


_RUN = """
import torch
from deep.blocks import blocks_for
from deep.data import get_benchmark
from deep.models import build_model
from deep.train import TrainConfig, fit
torch.manual_seed(0)
torch.set_num_threads(1)
task = get_benchmark("synthetic").load_task(None, "noise", n_target=64, val_per_class=4,
                                            test_per_class=4, seed=0)
for kwargs in ({}, {"fold_bn": False}, {"use_cache": False, "channels_last": True}):
    fit(build_model("resnet26-w4", 4), task.train, task.val, task.test, "second",
        TrainConfig(lr=1e-2, epochs=1, **kwargs), blocks_for("resnet26-w4"))
print("done")
"""

# e.g. "...,backward_weights,src:f32::blocked:acdb::f0 ...,mb64_ic4oc8_ih16oh8kh1sh2dh0ph0_iw16ow8kw1sw2dw0pw0"
_SHAPE = re.compile(r"ic(\d+)oc\d+_ih\d+oh\d+kh(\d+)sh(\d+)\w*_iw\d+ow\d+kw(\d+)sw(\d+)")


def faulty_kernel_runs(script: str, isa: str) -> list[str]:
    """Run `script` (it prints "done" at the end) under oneDNN's log on `isa`; the logged
    weight gradients of 1x1 strided convolutions with input channels not a multiple of 8
    on a channels-last source, after checking the script did run such a convolution."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "ONEDNN_MAX_CPU_ISA": isa, "MALLOC_CHECK_": "3"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("done"), done.stderr[-2000:]
    weight_grads = [line for line in done.stdout.splitlines()
                    if ",exec," in line and ",convolution," in line and ",backward_weights," in line]
    assert weight_grads, "oneDNN logged no weight gradient: ONEDNN_VERBOSE not honoured?"
    strided_1x1 = []
    for line in weight_grads:
        m = _SHAPE.search(line)
        assert m, f"unparsed oneDNN shape in: {line}"
        ic, kh, sh, kw, sw = map(int, m.groups())
        if kh == kw == 1 and (sh, sw) != (1, 1):
            strided_1x1.append((ic, "src:f32::blocked:acdb" in line, line))
    # resnet26-w4's second stage starts with a 4 -> 8 1x1 stride-2 downsample.
    assert any(ic % 8 for ic, _, _ in strided_1x1), "the run never hit the shape it should test"
    return [line for ic, cl, line in strided_1x1 if ic % 8 and cl]


@pytest.mark.pins_isa
@pytest.mark.skipif(torch.__version__.split("+")[0] != "2.13.0",
                    reason="docs/troubleshooting.md's reproducer is of torch 2.13.0's kernels")
@pytest.mark.skipif(not _cpu_has_avx2(), reason="needs a CPU with AVX2 (oneDNN's AVX2 kernels)")
def test_the_documented_reproducer_crashes_on_avx2_kernels(tmp_path):
    """docs/troubleshooting.md: `ONEDNN_MAX_CPU_ISA=AVX2 python scripts/onednn_avx2_repro.py`
    aborts (rc 134; now and then a segfault, once a bus error: whatever the corrupted heap
    meets first). Were it to complete, the reproducer would no longer show the fault the
    guard exists for (a changed script, or another kernel)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "onednn_avx2_repro.py")],
                          env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in (-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS), \
        (done.returncode, done.stdout, done.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.pins_isa
@pytest.mark.parametrize("isa", ["SSE41", "AVX2", "DEFAULT"])
def test_engine_never_runs_the_faulty_kernel_shape(isa):
    bad = faulty_kernel_runs(_RUN, isa)
    assert not bad, f"{len(bad)} channels-last 1x1 strided weight gradients, e.g. {bad[0]}"


_CALLER_LAYOUTS_RUN = """
import torch
from torch import nn
from deep.adapt.core import MemoConfig, make_adapter, run_stream
from deep.augment_memo import MemoAugmenter
from deep.data.base import TensorSplit
from deep.models.staged import StagedModel, guard_channels_last
from deep.train import TrainConfig, fit
torch.manual_seed(0)
torch.set_num_threads(1)
def net():  # a caller's model with the convolution the bug hits (4 -> 8, 1x1, stride 2)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
ALL = {"all": ("0", "2", "6")}
class UserStaged(StagedModel):
    stage_prefixes = (("conv1", "bn1"), ("down",), ("fc",))
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.down, self.fc = nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.Linear(8, 4)
    def conv_bn_pairs(self):
        return [("conv1", "bn1")]
    def stage(self, i, x):
        return (torch.relu(self.bn1(self.conv1(x))) if i == 0 else torch.relu(self.down(x))
                if i == 1 else self.fc(x.mean((2, 3))))
cl = lambda t: t.contiguous(memory_format=torch.channels_last)
split = lambda n, f=lambda t: t: TensorSplit(f(torch.randn(n, 3, 12, 12)), torch.arange(n) % 4)
train, val = split(64), split(16)
# torch.compile: Inductor picks channels-last convolutions on its own.
fit(net(), train, val, val, "all", TrainConfig(lr=1e-2, epochs=1, compile=True, use_cache=False), ALL)
# The caller's channels-last images, the engine's own layout off, with and without the cache.
for cache in (False, True):
    fit(net(), split(64, cl), val, val, "all",
        TrainConfig(lr=1e-2, epochs=1, channels_last=False, use_cache=cache), ALL)
# The same with a caller's StagedModel whose unsafe convolution has no BN to fold: the
# cache runs a copy of the model's modules, which must be guarded too.
fit(UserStaged(), split(64, cl), val, val, "all",
    TrainConfig(lr=1e-2, epochs=1, channels_last=False), {"all": ("conv1", "down", "fc")})
# The caller's model already channels-last.
fit(net().to(memory_format=torch.channels_last), train, val, val, "all",
    TrainConfig(lr=1e-2, epochs=1, channels_last=False, use_cache=False), ALL)
# Online adaptation (MEMO updates every weight of the block) on a channels-last model.
adapter = make_adapter(net().to(memory_format=torch.channels_last), "memo", "all", ALL,
                       MemoConfig(copies=8), augment=MemoAugmenter([0.5] * 3, [0.25] * 3),
                       generator=torch.Generator().manual_seed(0))
run_stream(adapter, torch.rand(4, 3, 12, 12), torch.arange(4) % 4, torch.arange(4))
# The caller's own loop, guarded as docs/troubleshooting.md says, then made channels-last.
model = net()
guard_channels_last(model)
model.to(memory_format=torch.channels_last)
for x, y, _ in split(64, cl).batches(16):
    nn.functional.cross_entropy(model(x), y).backward()
print("done")
"""


@pytest.mark.slow
@pytest.mark.pins_isa
def test_caller_layouts_compile_and_adaptation_never_run_the_faulty_kernel_shape():
    """Where the layout is not the engine's choice: a caller's channels-last images or
    model, torch.compile (Inductor's layout optimisation), MEMO's updates."""
    bad = faulty_kernel_runs(_CALLER_LAYOUTS_RUN, "AVX2")
    assert not bad, f"{len(bad)} channels-last 1x1 strided weight gradients, e.g. {bad[0]}"


_GROUP_NORM_RUN = """
import torch
from torch import nn
from deep.train import TrainConfig, fit
from deep.data.base import TensorSplit
torch.manual_seed(0)
torch.set_num_threads(1)
# A user's model (an nn.Sequential: every child is a stage) with plain torch GroupNorms.
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
split = lambda n: TensorSplit(torch.randn(n, 3, 12, 12), torch.arange(n) % 4)
train, val = split(64), split(16)
# Tuning only the second norm: its input comes from the prefix cache, needs no gradient.
fit(model, train, val, val, "norm", TrainConfig(lr=1e-2, epochs=2), {"norm": ("4",)})
print("done")
"""


@pytest.mark.slow
def test_group_norm_on_a_cached_channels_last_input_does_not_crash():
    """torch's CPU GroupNorm backward segfaults on a channels-last input that needs no
    gradient while its affine parameters do; the engine's guard covers any GroupNorm."""
    done = subprocess.run([sys.executable, "-c", _GROUP_NORM_RUN], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MALLOC_CHECK_": "3"})
    assert done.returncode == 0 and done.stdout.rstrip().endswith("done"), done.stderr[-2000:]


def test_group_norm_guard_only_where_the_crash_is():
    norm = nn.GroupNorm(2, 4)
    cl = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    from deep.models.staged import group_norm_unsafe
    assert group_norm_unsafe(norm, cl)
    assert not group_norm_unsafe(norm, cl.contiguous())
    assert not group_norm_unsafe(norm, cl.clone().requires_grad_())
    with torch.no_grad():
        assert not group_norm_unsafe(norm, cl)
    norm.requires_grad_(False)
    assert not group_norm_unsafe(norm, cl)


_MATRIX_RUN = """
import sys, torch
from deep.blocks import blocks_for
from deep.data.base import TensorSplit
from deep.models import build_model
from deep.train import TrainConfig, fit
torch.set_num_threads(1)
torch.manual_seed(0)
split = lambda n: TensorSplit(torch.randn(n, 3, 16, 16), torch.arange(n) % 4)
train, val = split(64), split(16)
CONFIGS = [{}, {"fold_bn": False}, {"use_cache": False, "channels_last": True},
           {"channels_last": "first"}, {"freeze_bn": False, "channels_last": True}]
for arch, methods in (("resnet26-w4", ["second", "all", "lp-ft", "auto-rgn", "auto-snr"]),
                      ("resnet26-gn", ["second", "all"])):
    for method in methods:
        for config in CONFIGS:
            if method == "auto-snr" and config.get("freeze_bn") is False:
                continue  # a ConfigError by design
            fit(build_model(arch, 4, 3), train, val, val, method,
                TrainConfig(lr=1e-2, epochs=2, **config), blocks_for(arch))
print("done")
"""


@pytest.mark.slow
@pytest.mark.pins_isa
def test_every_engine_configuration_completes_on_avx2_kernels():
    """Methods x engine configurations (cache, BN folding, channels-last everywhere / first
    stage / off, BN in train mode) on the model with the unsafe convolution and on a
    GroupNorm model, on oneDNN's AVX2 kernels, under glibc's strictest heap checks."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "MALLOC_CHECK_": "3"}
    done = subprocess.run([sys.executable, "-c", _MATRIX_RUN], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("done"), done.stderr[-2000:]


def test_a_prefix_cache_guards_its_copy_of_the_model_with_the_engine_layout_off():
    """With BN folded the cache runs a copy of the model's modules (`folded_view`), made
    before `fit` guards the model: with channels_last=False its unfolded unsafe
    convolution still met a caller's channels-last images unguarded (an abort on AVX2)."""
    from deep.data.base import TensorSplit
    from deep.models.staged import StagedModel
    from deep.prefix_cache import PrefixCache

    class Net(StagedModel):
        stage_prefixes = (("conv1", "bn1"), ("down",))

        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
            self.down = nn.Conv2d(4, 8, 1, stride=2, bias=False)  # no BN after it

        def conv_bn_pairs(self):
            return [("conv1", "bn1")]

        def stage(self, index, x):
            return self.bn1(self.conv1(x)) if index == 0 else self.down(x)

    model = Net().eval()
    split = TensorSplit(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    cache = PrefixCache(model, {"train": split}, channels_last=False)
    assert cache.runner is not model and cache.runner.down is not model.down
    assert getattr(cache.runner.down, "_nchw_guard", False)
    seen = []
    cache.runner.down.register_forward_pre_hook(lambda m, a: seen.append(a[0].stride()))
    cache.stages.run(split.images.contiguous(memory_format=torch.channels_last), 0)
    assert seen == [(4 * 6 * 6, 6 * 6, 6, 1)]  # the convolution saw NCHW strides


def test_a_conv2d_subclass_with_its_own_forward_is_guarded():
    """docs/troubleshooting.md's remedy for a functional convolution: make it an nn.Conv2d
    subclass; the guard goes by the module, whatever its forward computes."""
    class Down(nn.Conv2d):
        def forward(self, x):
            return nn.functional.conv2d(x, self.weight * 1.0, None, self.stride)

    model = nn.Sequential(Down(4, 8, 1, stride=2, bias=False))
    assert guard_channels_last(model) == 1
    seen = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].stride()))
    model(torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last))
    assert seen == [(4 * 6 * 6, 6 * 6, 6, 1)]


_FUNCTIONAL_RUN = """
import torch
from torch import nn
from torch.nn import functional as F
from deep.adapt.core import MemoConfig, make_adapter, run_stream
from deep.augment_memo import MemoAugmenter
from deep.data.base import TensorSplit
from deep.train import TrainConfig, fit
torch.manual_seed(0)
torch.set_num_threads(1)
class Down(nn.Module):  # the 4 -> 8, 1x1, stride-2 convolution, computed with F.conv2d
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 4, 1, 1) / 2)
    def forward(self, x):
        return F.conv2d(x, self.weight, None, 2)
class Norm(nn.Module):  # a GroupNorm computed with F.group_norm on parameters of its own
    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))
    def forward(self, x):
        return F.group_norm(x, 4, self.weight, self.bias)
def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Down(), Norm(), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
BLOCKS = {"all": ("0", "2", "3", "7"), "norm": ("3",)}
split = lambda n: TensorSplit(torch.randn(n, 3, 12, 12), torch.arange(n) % 4)
train, val = split(64), split(16)
one_epoch = dict(lr=1e-2, epochs=1)
# The engine's defaults: the prefix cache runs the stages channels-last on the CPU.
for method in ("all", "auto-rgn", "auto-snr", "norm"):
    fit(net(), train, val, val, method, TrainConfig(**one_epoch), BLOCKS)
fit(net(), train, val, val, "all",
    TrainConfig(**one_epoch, use_cache=False, channels_last=True), BLOCKS)
for channels_last in (None, True):  # torch.compile: Inductor picks layouts on its own
    fit(net(), train, val, val, "all",
        TrainConfig(**one_epoch, use_cache=False, compile=True, channels_last=channels_last),
        BLOCKS)
# Online adaptation on a channels-last model (MEMO: every weight of the block).
adapter = make_adapter(net().to(memory_format=torch.channels_last), "memo", "all", BLOCKS,
                       MemoConfig(copies=8), augment=MemoAugmenter([0.5] * 3, [0.25] * 3),
                       generator=torch.Generator().manual_seed(0))
run_stream(adapter, torch.rand(4, 3, 12, 12), torch.arange(4) % 4, torch.arange(4))
print("done")
"""


@pytest.mark.slow
@pytest.mark.pins_isa
def test_functional_convolutions_and_group_norms_never_run_the_faulty_kernels():
    """A convolution computed with F.conv2d (and a GroupNorm with F.group_norm) on a
    module's own weights: no hook sees them. Under the engine's defaults (the cache's
    channels-last stages) the convolution's weight gradient ran channels-last and aborted
    on the AVX2-only machine; the engine runs every such call on NCHW strides."""
    bad = faulty_kernel_runs(_FUNCTIONAL_RUN, "AVX2")
    assert not bad, f"{len(bad)} channels-last 1x1 strided weight gradients, e.g. {bad[0]}"


def test_plain_strided_calls_change_the_layout_of_the_faulty_shapes_only():
    """Inside the engine's context a faulty-shape conv2d or group_norm call sees NCHW
    strides, whatever the caller passed (positional or keyword arguments); other calls
    keep their layout; the numbers are the same."""
    from torch.overrides import TorchFunctionMode

    from deep.models.staged import plain_strided_calls

    class Seen(TorchFunctionMode):  # entered first, so it sees what the engine's passes on
        def __init__(self):
            super().__init__()
            self.strides = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.conv2d, F.group_norm):
                x = kwargs.get("input", args[0] if args else None)
                self.strides.append(x.stride())
            return func(*args, **kwargs)

    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    x = cl(torch.randn(2, 4, 6, 6))
    nchw, channels_last = (144, 36, 6, 1), (144, 1, 24, 4)
    weight = nn.Parameter(torch.randn(8, 4, 1, 1))
    kernel_3x3, weight8 = torch.randn(8, 4, 3, 3), torch.randn(8, 8, 1, 1)
    x8 = cl(torch.randn(2, 8, 6, 6))
    affine = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))
    calls = [  # (call, strides the function receives)
        (lambda: F.conv2d(x, weight, None, 2), nchw),
        (lambda: F.conv2d(x, weight, stride=(1, 2)), nchw),
        (lambda: torch.conv2d(input=x, weight=weight, stride=2), nchw),
        (lambda: F.conv2d(x, weight, None, 1), channels_last),   # stride 1: safe
        (lambda: F.conv2d(x, kernel_3x3, None, 2), channels_last),  # 3x3
        (lambda: F.conv2d(x8, weight8, None, 2), (288, 1, 48, 8)),  # 8 input channels
        (lambda: F.group_norm(x, 2, *affine), nchw),
        (lambda: F.group_norm(x, 2), channels_last),            # no affine to train
    ]
    model = nn.Linear(1, 1)  # on the CPU
    for call, expected in calls:
        outside = call()
        seen = Seen()
        with seen, plain_strided_calls(model):
            inside = call()
        assert seen.strides == [expected]
        torch.testing.assert_close(inside, outside, rtol=0, atol=1e-6)


def test_plain_strided_calls_stay_out_of_the_way_off_the_cpu():
    """CUDA has no oneDNN: a model there gets no mode (no Python call per torch op)."""
    from torch.overrides import TorchFunctionMode

    from deep.models.staged import plain_strided_calls

    assert isinstance(plain_strided_calls(nn.Linear(1, 1)), TorchFunctionMode)
    assert not isinstance(plain_strided_calls(nn.Linear(1, 1, device="meta")),
                          TorchFunctionMode)


def test_the_probe_finds_the_calls_no_hook_covers_and_only_those():
    """`UnhookedCalls` decides whether a run's forward passes pay for the mode: a
    faulty-shape F.conv2d or an affine F.group_norm on a weight of a module's own, yes;
    the same computed by hooked modules (nn.Conv2d, nn.GroupNorm) or of a safe shape, no."""
    from deep.models.staged import UnhookedCalls

    def unhooked_calls(model, x):
        with UnhookedCalls(model) as probe:
            model(x)
        return probe.found

    class Functional(nn.Module):
        def __init__(self, shape, call):
            super().__init__()
            self.weight, self.call = nn.Parameter(torch.randn(shape)), call

        def forward(self, x):
            return self.call(x, self.weight)

    down = Functional((8, 4, 1, 1), lambda x, w: F.conv2d(x, w, None, 2))
    down_one_way = Functional((8, 4, 1, 1), lambda x, w: F.conv2d(x, w, stride=(1, 2)))
    safe_stride = Functional((8, 4, 1, 1), lambda x, w: F.conv2d(x, w))
    safe_kernel = Functional((8, 4, 3, 3), lambda x, w: F.conv2d(x, w, None, 2))
    norm = Functional((4,), lambda x, w: F.group_norm(x, 2, w))
    x = torch.randn(1, 4, 8, 8)
    assert unhooked_calls(down, x) == ["conv2d with a (8, 4, 1, 1) weight"]
    assert unhooked_calls(down_one_way, x) == ["conv2d with a (8, 4, 1, 1) weight"]
    assert unhooked_calls(norm, x) == ["group_norm with a (4,) weight"]
    for covered in (safe_stride, safe_kernel, nn.Conv2d(4, 8, 1, stride=2), nn.GroupNorm(2, 4),
                    nn.GroupNorm(2, 4, affine=False)):
        assert unhooked_calls(covered, x) == [], covered


def test_a_run_pays_for_the_mode_only_when_the_probe_finds_a_call():
    """The built-in models make every faulty-shape call through hooked modules: their
    runs' forward passes go without the mode; a model with an F.conv2d of that shape gets it."""
    from torch.overrides import TorchFunctionMode

    from deep.data.base import TensorSplit
    from deep.methods import get_method
    from deep.models import build_model
    from deep.train import TrainConfig, TrainingRun

    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 4, 1, 1))

        def forward(self, x):
            return F.conv2d(x, self.weight, None, 2)

    split = TensorSplit(torch.randn(8, 4, 8, 8), torch.arange(8) % 4)
    functional = nn.Sequential(Down(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    runs = {}
    for name, model in (("resnet26-w4", build_model("resnet26-w4", 4, 4)),
                        ("functional", functional)):
        blocks = {"all": tuple(n for n, _ in model.named_children())}
        run = TrainingRun(model, split, split, None, get_method("all", blocks),
                          TrainConfig(lr=1e-2, epochs=1), None)
        assert isinstance(run.guarded_calls(), TorchFunctionMode)  # before the probe: guarded
        run.check_labels()
        runs[name] = run
    assert runs["resnet26-w4"].unhooked == []
    assert not isinstance(runs["resnet26-w4"].guarded_calls(), TorchFunctionMode)
    assert runs["functional"].unhooked == ["conv2d with a (8, 4, 1, 1) weight"]
    assert isinstance(runs["functional"].guarded_calls(), TorchFunctionMode)
