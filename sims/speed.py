"""Speed benchmark: the batched simulator against a per-run numpy loop, in one run.

    python -m sims.speed [--runs 512] [--d 64] [--k 32] [--n 16] [--steps 2000]
                         [--loop-runs 16] [--device auto] [--threads 1] [--no-compile]

Workload: `runs` independent full fine-tuning runs ("all") of a linear two-layer net, each
with its own pretrained net, sample and step size (lr = 0.5 / the starting curvature).

Baseline: a straightforward numpy loop, one run at a time, doing theory.finetune's
arithmetic (Z = X B^T, r = Z v - y, dL/dv = Z^T r / n, dL/dB = (r v^T)^T X / n) without
its bookkeeping; it is timed on `loop-runs` runs (best of 3) and extrapolated to all of
them.

Flops are counted for what each algorithm does: the loop 2 n k d + 3 n k + 2 k d
multiply-adds a step; the simulator (sample coordinates, see sims/simulator.py)
4 n k + n^2 + k. A matrix-vector algorithm cannot approach the `torch.bmm` peak, so the
benchmark also measures memory bandwidth (a streaming add) and reports the simulator
against the bound that binds: its minimal memory traffic (each state tensor read and
written once a step) divided by that bandwidth.
The last line is `speedup: <ratio>` for float32 with torch.compile on one CPU thread
(eager if torch.compile is unavailable or with --no-compile) against the loop on one
core; every configuration is printed with its error against float64.
"""
import argparse
import time

import numpy as np
import torch

import theory

from .simulator import Batch, resolve_device, simulate, start_curvature


def make_workload(runs, d, k, n, seed=0):
    """Pretrained nets, samples from random linear teachers, per-run lr (numpy)."""
    rng = np.random.default_rng(seed)
    nets, samples = [], []
    for _ in range(runs):
        net = theory.TwoLayer(rng.standard_normal(k) / np.sqrt(k),
                              rng.standard_normal((k, d)) / np.sqrt(d))
        X = rng.standard_normal((n, d))
        teacher = rng.standard_normal(d) / np.sqrt(d)
        nets.append(net)
        samples.append((X, X @ teacher))
    probe = Batch.build(nets, samples, "all", 1.0, device="cpu")
    lr = (0.5 / start_curvature(probe)).numpy()
    return nets, samples, lr


def numpy_loop(net, X, y, steps, lr):
    """Full fine-tuning of one run, plain numpy (theory.finetune's arithmetic)."""
    v, B, n = net.v.copy(), net.B.copy(), X.shape[0]
    for _ in range(steps):
        Z = X @ B.T
        r = Z @ v - y
        grad_v = Z.T @ r / n
        grad_B = (r[:, None] * v[None, :]).T @ X / n
        v, B = v - lr * grad_v, B - lr * grad_B
    return v, B


def best_time(function, repeats):
    """Smallest wall time of `repeats` calls (the others were disturbed by something)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def bmm_peak(dtype, device):
    """GFLOP/s of torch.bmm on 32 products of 256 x 256 matrices (best of 5)."""
    a = torch.randn(32, 256, 256, dtype=dtype, device=device)
    b = torch.randn(32, 256, 256, dtype=dtype, device=device)
    torch.bmm(a, b)
    seconds = best_time(lambda: (torch.bmm(a, b), _sync(device)), 5)
    return 2 * 32 * 256**3 / seconds / 1e9


def bandwidth(megabytes, dtype, device):
    """GB/s of c = a + b on arrays of `megabytes` each (3 arrays moved; best of 10)."""
    count = int(megabytes * 2**20 / torch.finfo(dtype).bits * 8)
    a, b, c = (torch.randn(count, dtype=dtype, device=device) for _ in range(3))
    seconds = best_time(lambda: (torch.add(a, b, out=c), _sync(device)), 10)
    return 3 * a.element_size() * count / seconds / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def positive_int(text):
    """argparse type: an integer >= 1 (a usage error, not a traceback, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv):
    """The flags, checked: (args, device, thread counts); a bad flag is a usage error."""
    parser = argparse.ArgumentParser(prog="python -m sims.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=positive_int, default=512)
    parser.add_argument("--d", type=positive_int, default=64)
    parser.add_argument("--k", type=positive_int, default=32)
    parser.add_argument("--n", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=2000)
    parser.add_argument("--loop-runs", type=positive_int, default=16,
                        help="runs the numpy loop is timed on (then extrapolated)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads",
                        help="comma-separated torch CPU thread counts to time (default 1, "
                             "the same one core as the loop; CPU only)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile configurations (eager only)")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if not 1 <= args.loop_runs <= args.runs:
        parser.error(f"--loop-runs must be in 1..{args.runs}")
    try:
        threads = [positive_int(t) for t in (args.threads or "1").split(",")]
    except argparse.ArgumentTypeError:
        parser.error(f"--threads must be comma-separated positive integers, got {args.threads!r}")
    if device.type != "cpu":
        if args.threads is not None:  # it would time the GPU once, at torch's thread count
            parser.error(f"--threads times torch CPU thread counts, and this run is on {device}: "
                         "drop --threads, or time the CPU with --device cpu")
        threads = [torch.get_num_threads()]
    return args, device, threads


def loop_multiply_adds(n, k, d):
    """Multiply-adds of a step of the numpy loop (its two n k d products dominate)."""
    return 2 * n * k * d + 3 * n * k + 2 * k * d


def simulator_multiply_adds(n, k):
    """A step of the simulator in sample coordinates (sims/simulator.py)."""
    return 4 * n * k + n * n + k


def time_loop(nets, samples, lr, steps, loop_runs, runs, macs):
    """The numpy loop on one core, timed on `loop_runs` runs and extrapolated to `runs`
    (whose steps do `macs` multiply-adds in all): (seconds, the timed runs' results).
    Prints its line."""
    torch.set_num_threads(1)
    results = []

    def loop():
        results[:] = [numpy_loop(nets[i], *samples[i], steps, lr[i]) for i in range(loop_runs)]
    seconds = best_time(loop, 3) * runs / loop_runs
    print(f"numpy loop, one run at a time (1 core): timed on {loop_runs} runs (best of 3), "
          f"extrapolated to {runs}: {seconds:.2f} s "
          f"({seconds / (runs * steps) * 1e6:.1f} us a step, "
          f"{2 * macs / seconds / 1e9:.1f} GFLOP/s)")
    return seconds, results


def measure_limits(thread_options, device):
    """(bmm peak, bandwidth on 64 MB, on 4 MB) per (dtype, threads), each printed."""
    peaks = {}
    for dtype in (torch.float64, torch.float32):
        for threads in thread_options:
            torch.set_num_threads(threads)
            peaks[dtype, threads] = (bmm_peak(dtype, device), bandwidth(64, dtype, device),
                                     bandwidth(4, dtype, device))
            gflops, dram, cache = peaks[dtype, threads]
            print(f"limits, {str(dtype)[6:]}, {threads} thread(s): torch.bmm peak "
                  f"{gflops:.0f} GFLOP/s; streaming add {dram:.0f} GB/s (64 MB arrays), "
                  f"{cache:.0f} GB/s (4 MB arrays)")
    return peaks


class CompileUnavailable(Exception):
    """The warm-up failed: torch.compile without a C++ compiler, ... (the error's type)."""


def time_simulator(batch, steps, compiled, device):
    """(seconds, result) of `simulate` after a warm-up, and the warm-up's seconds (which
    include compiling); CompileUnavailable where the warm-up fails."""
    result = None

    def run():
        nonlocal result
        result = simulate(batch, steps, compile=compiled)
        _sync(device)
    warm = time.perf_counter()
    try:
        simulate(batch, 2 * 16, compile=compiled)                   # warm-up (compiles)
    except Exception as error:
        raise CompileUnavailable(type(error).__name__) from error
    warm = time.perf_counter() - warm
    return best_time(run, 2), result, warm


def relative_gap(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


LEGEND = ("GFLOP/s: the simulator's own flops over its time; % bmm: of the bmm peak (same "
          "dtype and threads).\nGB/s: its minimal memory traffic (each state tensor read "
          "and written once a step) over its time; % bw: of the streaming add on 4 MB arrays "
          "(its working set is 2.5-5 MB), the bound that binds a matrix-vector algorithm.\n"
          "eff GFLOP/s: the flops of the textbook step that the numpy loop does (2ndk + ...), "
          "for the same result, over the simulator's time; % bmm: of the bmm peak.")


def main(argv=None):
    args, device, thread_options = parse_args(argv)
    R, d, k, n, steps = args.runs, args.d, args.k, args.n, args.steps
    print(f"workload: {R} runs of full fine-tuning (linear), d = {d}, k = {k}, n = {n}, "
          f"{steps} steps; device {device}; torch {torch.__version__}")
    nets, samples, lr = make_workload(R, d, k, n)
    loop_macs = loop_multiply_adds(n, k, d) * R * steps
    loop_seconds, loop_results = time_loop(nets, samples, lr, steps, args.loop_runs, R, loop_macs)
    sim_macs = simulator_multiply_adds(n, k) * R * steps
    print(f"flops counted: loop {loop_multiply_adds(n, k, d)} and simulator "
          f"{simulator_multiply_adds(n, k)} multiply-adds per run and step")
    peaks = measure_limits(thread_options, device)

    print(f"{'simulator':<34}{'seconds':>8}{'ratio':>7}{'GFLOP/s':>9}{'% bmm':>7}"
          f"{'GB/s':>7}{'% bw':>6}{'eff GFLOP/s':>12}{'% bmm':>7}  error")
    configs = [(torch.float64, threads, False) for threads in thread_options]
    configs += [(torch.float32, threads, False) for threads in thread_options]
    if not args.no_compile:
        configs += [(torch.float64, thread_options[0], True), (torch.float32, thread_options[0], True)]
    reference, ratios = None, {}
    for dtype, threads, compiled in configs:
        torch.set_num_threads(threads)
        batch = Batch.build(nets, samples, "all", lr, dtype=dtype, device=device)
        try:
            seconds, result, warm = time_simulator(batch, steps, compiled, device)
        except CompileUnavailable as error:
            print(f"{'(compile unavailable: ' + str(error) + ')':<34}")
            continue
        v, B = result.v.double().cpu().numpy(), result.B.double().cpu().numpy()
        if reference is None:  # the first row, float64 eager, against the loop
            reference = (v, B)
            gap = max(relative_gap(v[i], loop_results[i][0]) for i in range(args.loop_runs))
            error = f"v vs numpy loop {gap:.1e}"
        else:
            error = (f"vs float64 eager: v {relative_gap(v, reference[0]):.1e}"
                     f", B {relative_gap(B, reference[1]):.1e}")
        if compiled:
            error += f"; compiling took {warm:.0f} s"
        gflops, dram, cache = peaks[dtype, threads]
        achieved = 2 * sim_macs / seconds / 1e9
        effective = 2 * loop_macs / seconds / 1e9
        bytes_per_step = (4 * n * k + n * n + 2 * n + 2 * k) * batch.v.element_size() * R
        traffic = bytes_per_step * steps / seconds / 1e9
        ratios[dtype, threads, compiled] = loop_seconds / seconds
        name = f"{str(dtype)[6:]}, {threads} thread(s){', compiled' if compiled else ''}"
        print(f"{name:<34}{seconds:>8.3f}{loop_seconds / seconds:>7.1f}{achieved:>9.1f}"
              f"{100 * achieved / gflops:>6.1f}%{traffic:>7.1f}{100 * traffic / cache:>5.0f}%"
              f"{effective:>12.1f}{100 * effective / gflops:>6.0f}%  {error}")
    print(LEGEND)
    one = thread_options[0]
    headline = ratios.get((torch.float32, one, True), ratios.get((torch.float32, one, False)))
    print(f"headline: float32{', compiled' if (torch.float32, one, True) in ratios else ''}, "
          f"{one} thread(s), against the one-run-at-a-time numpy loop on one core")
    print(f"speedup: {headline:.1f}")


if __name__ == "__main__":
    main()
