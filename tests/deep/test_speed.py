"""`python -m deep.speed` end to end on a tiny setting: the output a user reads, the
accuracy check, and the work each loop does (counted FLOPs, not timings)."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from deep import speed
from tests.scripts import load_script

TINY = ["--arch", "resnet26-w4", "--n-train", "64", "--n-val", "16", "--n-test", "32",
        "--epochs", "2", "--lrs", "1e-3", "--count-work", "--profile"]


@pytest.fixture(scope="module")
def tiny_run():
    threads, out = torch.get_num_threads(), io.StringIO()
    try:
        with redirect_stdout(out):
            rc = speed.main(TINY)  # sets one torch thread, as the benchmark does
    finally:
        torch.set_num_threads(threads)
    return rc, out.getvalue().splitlines()


def _table_rows(lines, title, row_pattern):
    """option -> its two numbers, from the table under the line starting with `title`
    (after its header line), up to the first line `row_pattern` does not match."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = {}
    for line in lines[start + 2:]:
        m = re.match(row_pattern, line)
        if not m:
            break
        rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def _work_rows(lines):
    """option -> (reference GFLOP, ours GFLOP) from the work table."""
    return _table_rows(lines, "# work:", r"\s*(\S+) \|\s+([\d.]+)\s+([\d.]+)\s")


def test_both_loops_agree_and_the_last_line_is_the_total(tiny_run):
    rc, lines = tiny_run
    assert rc == 0
    assert re.fullmatch(r"total speedup: \d+\.\d\dx", lines[-1])
    assert any(re.match(r"accuracy check: largest test-accuracy gap \d+\.\d\d points \(OK", line)
               for line in lines)
    timed = [line.split()[0] for line in lines if re.match(r"\s*\w+ \|\s+[\d.]+\s+[\d.]+\s+[\d.]+x", line)]
    assert timed[:5] == ["first", "second", "third", "last", "all"]


def test_ours_does_less_work_the_later_the_tuned_block(tiny_run):
    """Frozen weights get no gradient and cached prefixes are not recomputed, so ours'
    FLOPs fall block by block; the reference does the same full work for every option."""
    rows = _work_rows(tiny_run[1])
    assert list(rows) == ["first", "second", "third", "last", "all", "total"]
    ref = [rows[o][0] for o in ("first", "second", "third", "last", "all")]
    assert max(ref) - min(ref) <= 0.02 * max(ref)
    ours = [rows[o][1] for o in ("all", "first", "second", "third", "last")]
    assert all(a > b for a, b in zip(ours, ours[1:])), ours
    assert rows["last"][0] > 5 * rows["last"][1]
    # `all` trains as the reference does, and evaluates the test split once, not every epoch.
    assert rows["all"][1] < rows["all"][0]


def test_the_work_ratio_is_ref_over_ours_and_the_total_row_sums_every_option(tiny_run):
    # guards: the ratio printed as ours / ref; the total row counting the last option only
    start = next(i for i, line in enumerate(tiny_run[1]) if line.startswith("# work:"))
    rows = {}
    for line in tiny_run[1][start + 2:start + 8]:
        name, ref, ours, ratio = re.match(r"\s*(\S+) \|\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x",
                                          line).groups()
        rows[name] = (float(ref), float(ours), float(ratio))
    half = 0.005                                  # GFLOP and ratios are printed to 2 decimals
    for name, (ref, ours, ratio) in rows.items():
        assert (ref - half) / (ours + half) - half <= ratio <= (ref + half) / (ours - half) + half, name
    options = [rows[o] for o in ("first", "second", "third", "last", "all")]
    for column in (0, 1):
        assert abs(rows["total"][column] - sum(r[column] for r in options)) <= 6 * half

def test_count_flops_counts_weight_gradients_only_for_tuned_weights():
    x = torch.randn(2, 3, 8, 8)
    weight = torch.randn(4, 3, 3, 3)
    forward = 2 * 2 * 4 * 3 * 9 * 64  # multiply-adds x 2 of one 3x3 conv, padding 1

    def step(tuned):
        w = weight.clone().requires_grad_(tuned)
        out = F.conv2d(x, w, padding=1)
        if tuned:
            out.sum().backward()

    assert speed.count_flops(lambda: step(False)) == forward
    assert speed.count_flops(lambda: step(True)) == 2 * forward  # + weight gradient only


def test_profile_reports_each_options_convolution_share(tiny_run):
    _, lines = tiny_run
    shares = {option: share for option, (_, share) in _table_rows(
        lines, "# profile:", r"\s*(\S+) \|\s+([\d.]+)\s+([\d.]+)%").items()}
    assert set(shares) == {"first", "second", "third", "last", "all"}
    assert all(0 < v <= 100 for v in shares.values())


def test_convolution_share_is_measured_from_the_ops_that_ran():
    # a share of measured time: a convolution big enough (a few ms) that the small ops around
    # it stay small on a loaded machine, run once before (a share of 0.24 once, with 8
    # channels, unwarmed, while a second pytest run shared the two cores)
    x, conv, w = torch.randn(16, 16, 32, 32), torch.nn.Conv2d(16, 16, 3), torch.randn(256, 256)
    conv(x).sum().backward()
    _, conv_only = speed.convolution_share(lambda: conv(x).sum().backward())
    _, matmul_only = speed.convolution_share(lambda: [w @ w for _ in range(20)])
    assert conv_only > 0.5 and matmul_only == 0
    assert speed.is_convolution("aten::mkldnn_convolution")
    assert speed.is_convolution("aten::convolution_backward")
    assert not speed.is_convolution("aten::addmm") and not speed.is_convolution("aten::native_batch_norm")


# without the check under test, seconds of benchmark (not minutes) before the test fails
SMALLEST = ["--arch", "resnet26-w4", "--size", "8", "--n-train", "8", "--n-val", "4",
            "--n-test", "4", "--epochs", "1"]


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got '0'"),
    (["--lrs", "1e-3,-1"], "argument --lrs: expected comma-separated positive numbers"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (["--tolerance", "nan"], "argument --tolerance: expected a number >= 0, got 'nan'"),
    ([*SMALLEST, "--lrs", "1e-3,0.001"], "argument --lrs: '1e-3,0.001' lists 0.001 more than once"),
])
def test_bad_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        speed.main(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--arch", "nope"], "error: unknown arch 'nope'; known: resnet26,"),
    (["--device", "bogus"], "error: device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    (["--arch", "clip-vit-tiny", "--size", "8"],
     "error: --arch clip-vit-tiny takes images of 32x32 px; give --size 32"),
    # the synthetic gratings have 3 colour channels: 5 was conv2d's RuntimeError (3-channel
    # images into a 5-channel network) once the source model began to train
    ([*SMALLEST, "--channels", "5"],
     "error: channels must be at most 3 (the gratings' colour channels), got 5"),
])
def test_bad_values_are_one_line_before_any_training(flags, message, capsys):
    threads = torch.get_num_threads()
    try:
        assert speed.main(flags) == 2
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1
    assert "source model" not in captured.out  # nothing was pretrained


def test_thread_scaling_prints_a_time_per_thread_count(capsys):
    """scripts/thread_scaling.py, which docs/troubleshooting.md quotes: one line per count."""
    module = load_script("thread_scaling")
    threads = torch.get_num_threads()
    try:
        assert module.main(["--arch", "resnet26-w4", "--size", "16", "--batch", "4",
                            "--threads", "1,2"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert [re.fullmatch(r"resnet26-w4, 4 images of 16 px, (\d) thread\(s\): [\d.]+ s per "
                         r"forward\+backward", line).group(1) for line in lines] == ["1", "2"]



def test_guard_cost_times_steps_with_and_without_the_mode(capsys):
    """scripts/guard_cost.py, which docs/performance.md quotes: the forward's torch calls
    (each one the mode sees: a few, not the optimizer's hundreds) and the two timings."""
    module = load_script("guard_cost")
    assert module.main(["--arch", "resnet26-w4", "--channels", "3", "--size", "8",
                        "--batch", "4", "--steps", "1", "--rounds", "1"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    calls = re.fullmatch(r"resnet26-w4, 4 images of 3x8x8, \d+ thread\(s\): (\d+) torch "
                         r"calls per forward", first)
    assert calls and 50 < int(calls.group(1)) < 400  # ~150: 26 layers, each a few calls
    times = re.fullmatch(r"median per step: ([\d.]+) ms without the mode, ([\d.]+) ms with "
                         r"it; ratio ([\d.]+)", second)
    without, with_mode, ratio = map(float, times.groups())
    assert ratio == pytest.approx(with_mode / without, abs=0.02)  # ms printed to 0.01

def test_device_auto_runs_where_it_points(capsys):
    """`--device auto` (what `--device cuda`'s error on a GPU-less machine suggests) passed
    its check, pretrained the source model, then stopped at `.to("auto")`'s RuntimeError."""
    threads = torch.get_num_threads()
    try:
        assert speed.main([*SMALLEST, "--lrs", "1e-3", "--device", "auto"]) == 0
    finally:
        torch.set_num_threads(threads)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"device {expected}," in capsys.readouterr().out


# --- the scripts and deep.onednn_check, with fake clocks and fake subprocesses: counts,
# arithmetic, what reaches the probe (no timing assertions) ---------------------------------


def test_guard_cost_reports_the_median_per_step_in_ms_of_alternating_timings(monkeypatch, capsys):
    # guards: mean for median, seconds per timing not per step, the "with" timing without
    # the mode, --steps or --rounds ignored, the two medians swapped
    from types import SimpleNamespace
    module = load_script("guard_cost")
    # per timing, in run order (round by round: without, then with), seconds for 2 steps
    elapsed = [0.002, 0.004, 0.004, 0.006, 0.012, 0.020]
    stamps = []
    for i, d in enumerate(elapsed):
        stamps += [100.0 * (i + 1), 100.0 * (i + 1) + d]
    clock = iter(stamps)
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    entered, real_mode = [], module.plain_strided_calls

    def counting_mode(model):
        entered.append(model)
        return real_mode(model)

    monkeypatch.setattr(module, "plain_strided_calls", counting_mode)
    hooked, real_guard = [], module.guard_channels_last
    monkeypatch.setattr(module, "guard_channels_last",
                        lambda model: (hooked.append(model), real_guard(model))[1])
    assert module.main(["--arch", "resnet26-w4", "--channels", "3", "--size", "8",
                        "--batch", "2", "--steps", "2", "--rounds", "3"]) == 0
    assert len(entered) == 3 * 2  # every step of every "with" timing, none of "without"
    assert hooked == entered[:1]  # the engine's module hooks, on in both timings
    assert next(clock, None) is None  # two clock reads per timing, 2 x 3 timings
    # per step: without 1, 2, 6 ms (median 2, mean 3); with 2, 3, 10 ms (median 3, mean 5)
    assert capsys.readouterr().out.splitlines()[1] == (
        "median per step: 2.00 ms without the mode, 3.00 ms with it; ratio 1.500")


class _CountingNet(torch.nn.Module):
    """A one-weight stand-in network; each forward advances a fake clock by one second."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.now, self.threads = 0.0, []

    def forward(self, x):
        self.now += 1.0
        self.threads.append(torch.get_num_threads())
        return x.mean() * self.weight


def test_thread_scaling_times_only_the_repeats_after_a_warm_up(monkeypatch):
    # guards: no warm-up, the warm-up inside the timing, the total not divided by the
    # repeats, the thread count not set, the engine's channels-last guard left out
    from types import SimpleNamespace
    module = load_script("thread_scaling")
    net, guarded = _CountingNet(), []
    monkeypatch.setattr(module, "build_model", lambda arch, classes: net)
    monkeypatch.setattr(module, "guard_channels_last", guarded.append)
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: net.now))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # so that the run's own 2 shows
        seconds = module.seconds_per_step("resnet26-w4", 4, 2, threads=2, repeats=3)
    finally:
        torch.set_num_threads(threads)
    assert net.threads == [2] * (1 + 3)  # the warm-up, then 3 timed repeats, on 2 threads
    assert seconds == 1.0                 # 3 fake seconds over 3 repeats
    assert guarded == [net]


# a real line of ONEDNN_VERBOSE=1 output for the probe's weight gradient (torch 2.x, AVX2)
_VERBOSE = ("onednn_verbose,v1,primitive,exec,cpu,convolution,jit_1x1:avx2,backward_weights,"
            "src:f32::blocked:acdb::f0 wei:f32:ap:blocked:ABcd8b8a::f0 bia:undef::undef::: "
            "dst:f32::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,"
            "mb64_ic4oc8_ih16oh8kh1sh2dh0ph0_iw16ow8kw1sw2dw0pw0,0.0549316")


def test_onednn_probe_runs_the_shape_under_the_isa_and_reads_the_kernel(monkeypatch):
    # guards: the guarded flag passed inverted, --isa not reaching the subprocess, the wrong
    # field of the verbose line taken as the kernel, a crash after "ok" read as ok
    from types import SimpleNamespace
    from deep import onednn_check
    runs = []

    def fake_run(argv, env, **kwargs):
        runs.append((argv[-4:], env["ONEDNN_MAX_CPU_ISA"], env["MALLOC_CHECK_"]))
        return outcomes.pop(0)

    monkeypatch.setattr(onednn_check.subprocess, "run", fake_run)
    outcomes = [SimpleNamespace(returncode=0, stdout=f"{_VERBOSE}\nok\n", stderr=""),
                # glibc aborts at exit, after the probe printed "ok"
                SimpleNamespace(returncode=-6, stdout=f"{_VERBOSE}\nok\n",
                                stderr="free(): corrupted unsorted chunks\n")]
    assert onednn_check.probe(4, 8, 2, True, "AVX512_CORE") == ("ok", "jit_1x1:avx2")
    outcome, kernel = onednn_check.probe(4, 8, 2, False, "AVX2")
    assert outcome == "CRASH rc=-6 free(): corrupted unsorted chunks" and kernel == "jit_1x1:avx2"
    assert runs == [(["4", "8", "2", "1"], "AVX512_CORE", "3"), (["4", "8", "2", "0"], "AVX2", "3")]


def test_onednn_probe_gives_the_last_stderr_line_of_a_crash_without_a_heap_message(monkeypatch):
    """A probe that dies of something other than a heap check (no line says "free" or
    "corrupt") is reported by its last stderr line, where Python and the shell put the
    error itself, not by the first line of the traceback."""
    from types import SimpleNamespace
    from deep import onednn_check
    stderr = "Traceback (most recent call last):\n  File \"<string>\", line 9\nRuntimeError: bad shape\n"
    monkeypatch.setattr(onednn_check.subprocess, "run",
                        lambda argv, env, **kwargs: SimpleNamespace(returncode=1, stdout="",
                                                                    stderr=stderr))
    assert onednn_check.probe(3, 8, 1, True, "AVX2") == ("CRASH rc=1 RuntimeError: bad shape", "?")


@pytest.mark.parametrize("crashing, status", [(set(), 0), ({(7, 2)}, 1)])
def test_onednn_check_fails_only_on_a_guarded_crash(crashing, status, monkeypatch, capsys):
    # guards: raw crashes counted as guarded ones; the exit status ignoring guarded crashes
    from deep import onednn_check
    seen = []

    def fake_probe(cin, cout, stride, guarded, isa):
        seen.append((cin, stride, guarded, isa))
        if not guarded and stride == 2:  # every raw stride-2 shape crashes
            return "CRASH rc=-6 corrupted", "jit_1x1:avx2"
        if guarded and (cin, stride) in crashing:
            return "CRASH rc=-6 corrupted", "gemm:jit"
        return "ok", "jit_1x1:avx2"

    monkeypatch.setattr(onednn_check, "probe", fake_probe)
    assert onednn_check.main(["--isa", "AVX2"]) == status
    assert len(seen) == 2 * 24 and {s[3] for s in seen} == {"AVX2"}  # 8 channels x 3 strides
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 24 + 1
    assert lines[-1] == f"guarded crashes: {len(crashing)}"


# --- deep.speed's arithmetic and bookkeeping, with fake clocks, counters and cells (no
# timing assertions) -----------------------------------------------------------------------


def _clock(wall, cpu=None):
    from types import SimpleNamespace
    return SimpleNamespace(wall=wall, cpu=wall if cpu is None else cpu)


def test_timing_table_ratios_are_reference_over_ours_and_the_total_includes_setup():
    # guards: a ratio printed as ours / ref (wall or cpu); the setup left out of ours' total
    rows = [("first", 1e-3, _clock(6.0, 4.0), _clock(2.0, 1.0)),
            ("first", 1e-4, _clock(4.0, 4.0), _clock(3.0, 1.0)),
            ("all", 1e-3, _clock(9.0, 8.0), _clock(3.0, 2.0))]
    lines, timed, total = speed.timing_table(rows, ["first", "all"], _clock(4.0, 2.0))
    assert timed == {"first": (10.0, 5.0), "all": (9.0, 3.0)}
    # first: 10 / 5 wall, 8 / 2 cpu; all: 9 / 3 wall, 8 / 2 cpu;
    # total: 19 / (8 + 4 setup) wall = 1.5833, 16 / (4 + 2 setup) cpu = 2.6667
    assert [line.split() for line in lines[1:]] == [
        ["first", "|", "10.0", "5.0", "2.00x", "|", "4.00x"],
        ["all", "|", "9.0", "3.0", "3.00x", "|", "4.00x"],
        ["total", "|", "19.0", "12.0", "1.58x", "|", "2.67x"]]
    assert total == pytest.approx(19 / 12)


def test_clock_measures_wall_by_perf_counter_and_cpu_by_process_time(monkeypatch):
    from types import SimpleNamespace
    wall, cpu = iter([10.0, 13.5]), iter([100.0, 101.25])
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=lambda: next(wall),
                                                       process_time=lambda: next(cpu)))
    with speed.Clock() as c:
        pass
    assert (c.wall, c.cpu) == (3.5, 1.25)


def test_work_table_speedup_over_work_ratio_arithmetic(monkeypatch):
    # guards: the speedup taken as ours / ref; speedup / work ratio printed as a product
    calls = []
    monkeypatch.setattr(speed, "ours_setup", lambda *a, **k: ("model", "state", "cache"))
    monkeypatch.setattr(speed, "reference_run",
                        lambda ckpt, arch, task, option, lr, *rest, device: calls.append(("ref", option, lr)))
    monkeypatch.setattr(speed, "ours_run",
                        lambda m, s, c, blocks, task, option, lr, *rest: calls.append(("ours", option, lr)))
    flops = iter([8e9, 2e9, 6e9, 1e9])  # ref, ours of "first", then of "all"

    def fake_count(fn):
        fn()
        return next(flops)

    monkeypatch.setattr(speed, "count_flops", fake_count)
    timed = {"first": (12.0, 2.0), "all": (9.0, 3.0)}
    lines = speed.work_table(["first", "all"], "ckpt", "resnet26", None, 0.25, timed, 4.0,
                             (1, 64, 0.0, 0))
    assert calls == [("ref", "first", 0.25), ("ours", "first", 0.25),
                     ("ref", "all", 0.25), ("ours", "all", 0.25)]
    # first: work 8 / 2 = 4, speedup 12 / 2 = 6, 6 / 4 = 1.5; all: 6 / 1 = 6, 9 / 3 = 3, 0.5;
    # total: 14 / 3 = 4.67, given speedup 4, 4 / 4.667 = 0.857
    assert [line.split() for line in lines[1:]] == [
        ["first", "|", "8.00", "2.00", "4.00x", "|", "6.00x", "1.50x"],
        ["all", "|", "6.00", "1.00", "6.00x", "|", "3.00x", "0.50x"],
        ["total", "|", "14.00", "3.00", "4.67x", "|", "4.00x", "0.86x"]]


def _reference_source(tmp_path, n_train, n_val, n_test):
    """A tiny target task of `deep.speed` and an untrained resnet26-w4 saved as the source
    checkpoint `reference_run` loads."""
    from deep.checkpoints import save_checkpoint
    from deep.data.synthetic import NUM_CLASSES
    from deep.models import build_model
    _, task = speed.make_data(8, 1, 10, n_train=n_train, n_val=n_val, n_test=n_test)
    checkpoint = save_checkpoint(tmp_path / "source.pt", build_model("resnet26-w4", NUM_CLASSES, 1),
                                 "resnet26-w4", NUM_CLASSES, 1)
    return task, checkpoint


def _watch_reference_forwards(monkeypatch, hook):
    """`hook(model, inputs)` before every forward of the model `reference_run` loads."""
    real_load = speed.load_model

    def load_and_watch(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(speed, "load_model", load_and_watch)


def test_reference_run_trains_every_batch_and_evaluates_val_and_test_every_epoch(monkeypatch, tmp_path):
    # guards: the reference loop doing less work than the docstring states (a batch per
    # epoch, test evaluated once, frozen weights without requires_grad)
    task, checkpoint = _reference_source(tmp_path, n_train=20, n_val=4, n_test=6)
    seen = []
    _watch_reference_forwards(monkeypatch, lambda m, inputs: seen.append(
        (len(inputs[0]), all(p.requires_grad for p in m.parameters()))))
    speed.reference_run(checkpoint, "resnet26-w4", task, "last", 1e-3, 2, 8, 0.0, 0)
    # per epoch: 20 train images in batches of 8, 8, 4; then val (4) and test (6) in one batch each
    assert seen == [(n, True) for n in [8, 8, 4, 4, 6] * 2]


def test_time_cell_runs_both_loops_at_its_lr_and_reports_the_gap_in_points(monkeypatch, capsys):
    # guards: the gap in fractions, not points; a loop run at another lr than the cell's
    from types import SimpleNamespace
    ran = []
    monkeypatch.setattr(speed, "reference_run", lambda ckpt, arch, task, option, lr, *rest, device:
                        ran.append(("ref", option, lr)) or (0.5, 0.6))
    monkeypatch.setattr(speed, "ours_run", lambda m, s, c, blocks, task, option, lr, *rest:
                        ran.append(("ours", option, lr)) or 0.52)
    wall, cpu = iter([10.0, 13.0, 20.0, 21.0]), iter([0.0, 2.0, 5.0, 5.5])  # ref 3 s, ours 1 s
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=lambda: next(wall),
                                                       process_time=lambda: next(cpu)))
    args = SimpleNamespace(arch="resnet26", device="cpu", lrs=[1e-3, 1e-4])
    ref, ours, gap = speed.time_cell("ckpt", args, None, "last", 1e-4, (1, 64, 0.0, 0),
                                     (None, None, None, None))
    assert ran == [("ref", "last", 1e-4), ("ours", "last", 1e-4)]
    assert (ref.wall, ref.cpu, ours.wall, ours.cpu) == (3.0, 2.0, 1.0, 0.5)
    assert gap == pytest.approx(2.0)  # 52% against 50%
    assert capsys.readouterr().out.split() == ["last", "0.0001", "|", "3.00", "1.00", "|",
                                               "50.00", "52.00"]


def test_profile_table_prints_seconds_and_the_convolution_share_in_percent(monkeypatch):
    monkeypatch.setattr(speed, "ours_setup", lambda *a, **k: ("model", "state", "cache"))
    ran = []
    monkeypatch.setattr(speed, "ours_run", lambda m, s, c, blocks, task, option, lr, *rest:
                        ran.append((option, lr)))
    monkeypatch.setattr(speed, "convolution_share", lambda fn: (fn(), (2.5, 0.25))[1])
    lines = speed.profile_table(["first", "all"], "ckpt", "resnet26", None, 0.5, (1, 64, 0.0, 0))
    assert ran == [("first", 0.5), ("all", 0.5)]
    assert [line.split() for line in lines[1:]] == [["first", "|", "2.50", "25.0%"],
                                                    ["all", "|", "2.50", "25.0%"]]


def test_convolution_share_adds_op_self_times_in_seconds(monkeypatch):
    # guards: the profiler's microseconds read as milliseconds; autograd's capitalised
    # "ConvolutionBackward0" nodes not counted as convolution
    from types import SimpleNamespace
    events = [SimpleNamespace(key="aten::mkldnn_convolution", self_cpu_time_total=2_000_000),
              SimpleNamespace(key="autograd::engine::evaluate_function: ConvolutionBackward0",
                              self_cpu_time_total=1_000_000),
              SimpleNamespace(key="aten::addmm", self_cpu_time_total=1_000_000)]

    class FakeProfile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    assert speed.convolution_share(lambda: None) == (4.0, 0.75)


def _fake_run(monkeypatch, flags, gaps):
    """`speed.main(SMALLEST + flags)` with each (option, lr) cell faked: reference 2 s,
    ours 1 s, the given accuracy gaps in turn; (exit status, stdout lines, allocator calls)."""
    from types import SimpleNamespace
    cells, kept = iter(gaps), []
    monkeypatch.setattr(speed, "time_cell", lambda *a: (SimpleNamespace(wall=2.0, cpu=2.0),
                                                        SimpleNamespace(wall=1.0, cpu=1.0),
                                                        next(cells)))
    monkeypatch.setattr(speed, "keep_freed_memory", lambda: kept.append(1) or True)
    threads, out = torch.get_num_threads(), io.StringIO()
    try:
        torch.set_num_threads(1)
        with redirect_stdout(out):
            rc = speed.main([*SMALLEST, "--lrs", "1e-3", *flags])
    finally:
        torch.set_num_threads(threads)
    return rc, out.getvalue().splitlines(), kept


def test_the_accuracy_check_takes_the_largest_gap_of_all_cells(monkeypatch):
    # guards: only the last cell's gap checked; a gap equal to the tolerance failing
    rc, lines, _ = _fake_run(monkeypatch, [], [0.7, 0.0, 0.0, 0.0, 0.0])
    assert rc == 1
    assert "accuracy check: largest test-accuracy gap 0.70 points (FAILED, tolerance 0.5)" in lines
    rc, lines, _ = _fake_run(monkeypatch, ["--tolerance", "0.25"], [0.25] * 5)
    assert rc == 0
    assert "accuracy check: largest test-accuracy gap 0.25 points (OK, tolerance 0.25)" in lines


def test_threads_and_default_malloc_flags_reach_both_loops(monkeypatch):
    rc, lines, kept = _fake_run(monkeypatch, ["--threads", "2", "--default-malloc"], [0.0] * 5)
    assert rc == 0 and kept == []
    assert ", 2 torch threads," in lines[0] and lines[0].endswith("malloc for both loops: glibc defaults")


def test_by_default_both_loops_run_on_one_thread_with_freed_memory_kept(monkeypatch):
    rc, lines, kept = _fake_run(monkeypatch, [], [0.0] * 5)
    assert kept == [1]
    assert ", 1 torch threads," in lines[0]
    assert lines[0].endswith("malloc for both loops: freed memory kept (deep.allocator)")


def test_reference_run_returns_test_accuracy_at_the_first_best_validation_epoch(monkeypatch, tmp_path):
    # guards: the epoch picked by test accuracy, or the last of tied ones; (val, test) swapped
    task, checkpoint = _reference_source(tmp_path, n_train=8, n_val=4, n_test=4)
    # per epoch: (val, test); validation peaks at epochs 1 and 2, test at epoch 0
    accs = {"val": iter([0.5, 0.7, 0.7]), "test": iter([0.9, 0.6, 0.8])}
    monkeypatch.setattr(speed, "_reference_eval",
                        lambda model, split, batch_size, device="cpu": next(accs[split.name]))
    assert speed.reference_run(checkpoint, "resnet26-w4", task, "last", 1e-3, 3, 8, 0.0, 0) == (0.6, 0.7)


def test_reference_run_draws_its_batch_order_from_the_seed(monkeypatch, tmp_path):
    # guards: the reference's minibatch order seeded otherwise than the run's seed (both
    # loops must see the same batches: Split.order, a randperm per epoch from the seed)
    task, checkpoint = _reference_source(tmp_path, n_train=12, n_val=4, n_test=4)
    first_inputs = []
    _watch_reference_forwards(monkeypatch, lambda m, inputs: first_inputs.append(
        inputs[0].clone()) if not first_inputs else None)
    speed.reference_run(checkpoint, "resnet26-w4", task, "last", 1e-3, 1, 6, 0.0, 3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first_inputs[0], task.train.images[order[:6]])


def test_make_data_adds_sigma_0_6_noise_to_every_target_split_and_keeps_the_sizes():
    # guards: a target split left without the shift's noise; a split shorter than asked
    # (labels repeated n // classes times, not rounded up)
    source, task = speed.make_data(8, 1, 200, n_train=200, n_val=200, n_test=203)
    assert [len(s) for s in (source.train, task.train, task.val, task.test)] == [200, 200, 200, 203]
    assert task.test.labels.bincount().tolist() == [51, 51, 51, 50]  # 203 over 4 classes
    clean = source.train.images.var().item()
    for split in (task.train, task.val, task.test):
        # independent noise adds its variance, 0.6 ** 2 = 0.36
        assert split.images.var().item() - clean == pytest.approx(0.36, abs=0.06), split.name
