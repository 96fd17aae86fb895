"""The Ray backend against a real Ray runtime (no mocks).

Three clusters, one after the other (2 cores here): a local instance started in this
process (`ray.init(num_cpus=2)`), two small nodes (`ray.cluster_utils`) for a task no
node holds, and a head started by `ray start --head` as a separate process that
sweeps connect to with --ray-address. Every sweep is compared with the local
backend's rows, bitwise. Where Ray would wait forever, a test bounds the wait and
fails. The SLURM script's test stands in only for `srun` and `scontrol`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from pathlib import Path

import pytest
import ray
import torch

from deep.protocol import load_protocol
from deep.ray_backend import (RayBackendError, RayExecutor, RayOptions, TaskGroupError,
                               check_a_node_fits, check_data_dir, check_reachable,
                               concurrent_tasks, stop_groups, task_device)
from deep.sweep import COLUMNS, plan_cells, read_results, row_key, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")  # a Ray task runs on one thread too
ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
# Every column but the wall time and the machine (whose torch threads follow
# --cpus-per-task): the Ray backend must write the same rows.
COMPARED = tuple(c for c in COLUMNS if c not in ("seconds", "machine"))
# Two task groups of two cells: the fast protocol of most tests.
SMALL = dict(shifts=["noise", "flip"], methods=["first", "last"], lrs=[1e-2], seeds=[0],
             epochs=2, n_target=64, val_per_class=10, test_per_class=20)
# One task group of six cells that takes a few seconds: long enough to kill mid-task.
LONG = dict(shifts=["noise"], methods=["first", "last", "all"], lrs=[1e-2, 1e-3], seeds=[0],
            epochs=4, n_target=192, val_per_class=10, test_per_class=20)
LONG_FLAGS = ["--shifts", "noise", "--methods", "first,last,all", "--lrs", "0.01,0.001",
              "--seeds", "0", "--epochs", "4", "--n-target", "192", "--val-per-class", "10",
              "--test-per-class", "20"]


def protocol(settings):
    return load_protocol("synthetic").replace(**settings)


def on_ray(**options):
    return RayExecutor(RayOptions(**options))


def by_key(rows):
    return {row_key(r): tuple(r[c] for c in COMPARED) for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_checkpoint):
    """Rows of the local backend (one process, one thread) for SMALL and LONG."""
    folder = tmp_path_factory.mktemp("local")
    rows = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures start before `one_thread`)
    try:
        for name, settings in (("small", SMALL), ("long", LONG)):
            run_sweep(protocol(settings), folder / f"{name}.csv", progress=False)
            rows[name] = by_key(read_results(folder / f"{name}.csv"))
    finally:
        torch.set_num_threads(threads)
    return rows


def short_temp_dir():
    # Ray's socket paths must stay under 108 characters: pytest's tmp_path is too deep.
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


def own_ray_workers(task_name: str) -> list[int]:
    """PIDs of the Ray workers (descendants of this process) running `task_name` now."""
    children: dict[int, list[int]] = {}
    titles = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [os.getpid()]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            if titles.get(pid, "").startswith(f"ray::{task_name}"):
                found.append(pid)
    return found


class LosesFirstCancel:
    """The ray module, but the first `cancel` of each task does nothing."""

    def __init__(self, ray_):
        self._ray, self._seen = ray_, []

    def __getattr__(self, name):
        return getattr(self._ray, name)

    def cancel(self, ref, **options):
        if not any(ref is seen for seen in self._seen):
            self._seen.append(ref)
            return
        self._ray.cancel(ref, **options)


def kill_a_group_worker(out: Path, killed: list) -> None:
    """SIGKILL a worker running a task group once the group's first row is in `out`
    (two groups of three cells: LONG on two CPUs); note (pid, rows then) in `killed`.
    The bounds in this file only stop a hung run: `make test` shares the CPU among pytest
    workers, where a sweep takes several times as long as alone (27 s alone, 172 s with
    three workers on two cores, for the driver-kill test)."""
    deadline = time.time() + 300
    while time.time() < deadline and not killed:
        workers = own_ray_workers("run_group_task")
        if workers and out.exists() and 1 <= len(read_results(out)) < 6:
            os.kill(workers[0], signal.SIGKILL)
            killed.append((workers[0], len(read_results(out))))
        time.sleep(0.01)


def group_executions(since: float) -> Counter:
    """How many times each task group (by Ray task id; a retry keeps its task's id)
    started on this cluster at or after `since` (a `time.time()`), from Ray's task
    timeline. Counting only starts after `since` keeps out an earlier test's tasks, whose
    events (a killed or cancelled worker's among them) can reach the timeline seconds late."""
    since_us = since * 1e6  # the timeline's "ts" is the start in microseconds since the epoch
    return Counter(e["args"]["task_id"] for e in ray.timeline()
                   if e.get("cat") == "task::run_group_task" and e.get("ts", 0) >= since_us)


# --- a local Ray instance in this process -----------------------------------------

@pytest.fixture(scope="class")
def local_ray():
    temp = short_temp_dir()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.usefixtures("local_ray")
class TestLocalRay:
    def test_same_rows_as_the_local_backend(self, tmp_path, reference):
        out = tmp_path / "ray.csv"
        summary = run_sweep(protocol(SMALL), out, progress=False, executor=on_ray())
        assert summary.ran == 4 and by_key(read_results(out)) == reference["small"]
        # resuming a finished sweep runs nothing (and starts no task)
        assert run_sweep(protocol(SMALL), out, progress=False, executor=on_ray()).ran == 0

    def test_workers_need_no_checkpoint_file(self, tmp_path, reference, monkeypatch,
                                             synthetic_checkpoint):
        """The weights travel through Ray's object store: the driver reads the file, and
        it is gone (as on a node that does not hold it) before any task is submitted.
        The sweep must still give the local backend's rows."""
        import deep.ray_backend as backend

        checkpoint = tmp_path / "driver-only" / Path(synthetic_checkpoint).name
        checkpoint.parent.mkdir()  # a path of its own: no process has it cached
        shutil.copyfile(synthetic_checkpoint, checkpoint)
        submit, submitted = backend.execute_groups_on_ray, []

        def without_the_file(*args, **kwargs):
            checkpoint.unlink()  # the driver's reading is done: the tasks come next
            submitted.append(kwargs.get("pretrained", args[4] if len(args) > 4 else None))
            return submit(*args, **kwargs)

        monkeypatch.setattr(backend, "execute_groups_on_ray", without_the_file)
        out = tmp_path / "ray.csv"
        summary = run_sweep(protocol(SMALL), out, checkpoint=str(checkpoint), progress=False,
                            executor=on_ray())
        assert len(submitted) == 1 and isinstance(submitted[0], dict) and not checkpoint.exists()
        rows = read_results(out)
        assert summary.ran == 4 and {r["checkpoint"] for r in rows} == {str(checkpoint)}
        # the same rows as the local backend's, but for the path of the file read
        column = COMPARED.index("checkpoint")
        same = {key: values[:column] + values[column + 1:] for key, values in by_key(rows).items()}
        assert same == {key: values[:column] + values[column + 1:]
                        for key, values in reference["small"].items()}

    def test_a_killed_worker_is_retried_and_each_cell_written_once(self, tmp_path, reference):
        out = tmp_path / "ray.csv"
        killed = []
        killer = threading.Thread(target=kill_a_group_worker, args=(out, killed))
        killer.start()
        try:
            run_sweep(protocol(LONG), out, progress=False, executor=on_ray(max_retries=2))
        finally:
            killer.join()
        assert killed, "the worker finished its group before it could be killed"
        rows = read_results(out)
        assert len(rows) == 6 and by_key(rows) == reference["long"]

    def test_a_worker_killed_once_too_often_stops_the_sweep(self, tmp_path):
        out = tmp_path / "ray.csv"
        killer = threading.Thread(target=kill_a_group_worker, args=(out, []))
        killer.start()
        try:
            with pytest.raises(TaskGroupError, match=r"task group synthetic/noise seed 0 \(3 cells\): "
                                                     r"its worker died and Ray's retries are used up"):
                run_sweep(protocol(LONG), out, progress=False, executor=on_ray(max_retries=0))
        finally:
            killer.join()

    def test_a_data_error_stops_the_sweep_without_retries(self, tmp_path):
        started = time.time()
        # One cell, so one task group whatever the number of slots.
        bad = protocol({**SMALL, "shifts": ["noise"], "methods": ["first"], "n_target": 100_000})
        with pytest.raises(TaskGroupError, match=r"failed on node .*n_target=100000 exceeds"):
            run_sweep(bad, tmp_path / "bad.csv", progress=False, executor=on_ray(max_retries=3))
        assert read_results(tmp_path / "bad.csv") == []
        deadline = time.time() + 60  # task events reach the timeline about once a second
        while not group_executions(started) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # retries, had there been any, ran before the error reached us
        assert list(group_executions(started).values()) == [1]  # once: an error is not retried

    def test_a_failing_group_stops_the_groups_still_running(self, tmp_path, monkeypatch):
        """A task group that fails cancels the others: the sweep stops with its error, and
        a healthy group (a minute of work) is not left running on the cluster, even when
        Ray loses a cancel (as it can for a task being handed to a worker: here the
        first cancel of each task is dropped)."""
        import deep.ray_backend as backend

        submit = backend.execute_groups_on_ray

        def with_a_failing_group_first(ray_, groups, spec, record, *rest):
            bad = [dataclasses.replace(groups[0][0], shift="no-such-shift")]
            return submit(LosesFirstCancel(ray_), [bad, *groups], spec, record, *rest)

        monkeypatch.setattr(backend, "execute_groups_on_ray", with_a_failing_group_first)
        with pytest.raises(TaskGroupError, match=r"synthetic/no-such-shift seed 0 .*"
                                                 r"unknown shift\(s\) \['no-such-shift'\]"):
            run_sweep(protocol({**LONG, "epochs": 40}), tmp_path / "ray.csv", progress=False,
                      executor=on_ray())
        # A cancelled worker is killed within a moment; one left alone runs on for a minute
        # (or starts only now, its worker having been slower to start than the failing one's).
        failed_at, seen = time.time(), []
        while time.time() - failed_at < 8:
            time.sleep(0.2)
            if time.time() - failed_at > 3:
                seen += own_ray_workers("run_group_task")
        assert not seen, "the healthy task group still runs after the sweep failed"

    def test_a_data_dir_missing_on_a_node_is_named(self, tmp_path):
        check_data_dir(ray, str(tmp_path), 1, 0)  # visible: no error
        missing = str(tmp_path / "not-here")
        with pytest.raises(RayBackendError,
                           match=rf"--data-dir {missing} is not a folder on node\(s\) "
                                 rf"{socket.gethostname()} \("):
            check_data_dir(ray, missing, 1, 0)

    def test_a_shift_file_missing_on_a_node_is_named(self, tmp_path):
        """A partial copy on a node (one corruption file missing) is named before any task
        group runs, as a local sweep names it, not when its group loads that shift."""
        from tests.deep.fixtures.writers import write_cifar10c

        write_cifar10c(tmp_path, corruptions=("gaussian_noise",), per_severity=10)
        check_data_dir(ray, str(tmp_path), 1, 0, "--data-dir", "cifar10c", ("gaussian_noise",))
        with pytest.raises(RayBackendError,
                           match=rf"on node\(s\) {socket.gethostname()} \(.*\): cifar10c: 1 of "
                                 r"the 2 corruptions to run have no file in .*: fog\.npy"):
            check_data_dir(ray, str(tmp_path), 1, 0, "--data-dir", "cifar10c",
                           ("fog", "gaussian_noise"))

    def test_a_sweep_on_ray_names_the_missing_shift_before_any_group_runs(self, tmp_path):
        """The sweep passes its shifts to the nodes' check: fog's file is missing, so no
        task group starts (gaussian_noise's would have run first) and no row is written."""
        from deep.models import build_model
        from tests.deep.fixtures.writers import write_cifar10c

        write_cifar10c(tmp_path / "data", corruptions=("gaussian_noise",), per_severity=40)
        checkpoint = tmp_path / "r26.pt"
        torch.save(build_model("resnet26-gn", 10, 3).state_dict(), checkpoint)
        two_shifts = load_protocol("cifar10c").replace(
            shifts=["gaussian_noise", "fog"], methods=["last"], lrs=[1e-3], seeds=[0],
            epochs=1, n_target=10, val_per_class=1, test_per_class=1)
        with pytest.raises(RayBackendError, match=r"no file in .*: fog\.npy"):
            run_sweep(two_shifts, tmp_path / "c10c.csv", checkpoint=str(checkpoint),
                      data_dir=str(tmp_path / "data"), progress=False, executor=on_ray())
        assert read_results(tmp_path / "c10c.csv") == []

    def test_resources_the_cluster_lacks_are_an_error(self, tmp_path):
        # (on an autoscaling cluster the nodes may just not be up yet: the error says so)
        with pytest.raises(RayBackendError, match="has 0 GPUs; a task group needs --gpus-per-task "
                                                  "0.5 .*autoscaling cluster .*min_workers >= 1"):
            run_sweep(protocol(SMALL), tmp_path / "r.csv", progress=False,
                      executor=on_ray(gpus_per_task=0.5))
        with pytest.raises(RayBackendError, match="has 2 CPUs; a task group needs --cpus-per-task 4"):
            run_sweep(protocol(SMALL), tmp_path / "r.csv", progress=False,
                      executor=on_ray(cpus_per_task=4))


def test_gpus_per_task_default_to_one_where_gpus_exist_and_may_be_used():
    from deep.ray_backend import resolve_gpus
    gpus = {"CPU": 8, "GPU": 2}
    assert resolve_gpus(RayOptions(), "auto", gpus) == 1.0
    assert resolve_gpus(RayOptions(), None, gpus) == 1.0
    assert resolve_gpus(RayOptions(), "cpu", gpus) == 0.0      # --device cpu: none reserved
    assert resolve_gpus(RayOptions(), "auto", {"CPU": 8}) == 0.0
    assert resolve_gpus(RayOptions(gpus_per_task=0.5), "auto", {"CPU": 8}) == 0.5
    assert task_device("cpu", 0) == "cpu" and task_device("auto", 0.5) == "cuda"
    with pytest.raises(RayBackendError, match="--device cpu with --gpus-per-task 0.5"):
        task_device("cpu", 0.5)
    # --device cuda on a cluster without GPUs: said so, not "needs --gpus-per-task > 0", a
    # flag the user never gave
    with pytest.raises(RayBackendError, match="--device cuda, but the Ray cluster has 0 GPUs"):
        resolve_gpus(RayOptions(), "cuda", {"CPU": 8})
    assert resolve_gpus(RayOptions(), "cuda", gpus) == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_a_gpu_ray_gives_on_a_node_whose_torch_sees_none_names_the_ray_remedy():
    """`ray start --num-gpus 1` on a node with a CPU build of torch: the task said to use
    --device auto, which the user had used; the remedy under Ray is --gpus-per-task 0."""
    from deep.ray_backend import TaskGroupError, run_group_task
    cells = plan_cells(protocol(SMALL))[:1]
    with pytest.raises(TaskGroupError, match=r"was given a GPU on node .*, but torch there "
                                             r"sees none .*--gpus-per-task 0 \(or --device cpu\)"):
        next(run_group_task(cells, {"device": "cuda"}, {}, 1))


def test_fractional_gpus_pack_task_groups():
    assert concurrent_tasks({"CPU": 16, "GPU": 1}, 1, 0.25) == 4  # four groups share the GPU
    assert concurrent_tasks({"CPU": 16, "GPU": 8}, 2, 1) == 8
    assert concurrent_tasks({"CPU": 3, "GPU": 2}, 1, 0.5) == 3  # CPUs bind
    assert concurrent_tasks({"CPU": 2}, 1, 0) == 2
    # in Ray's fixed point, not floats (1 // 0.1 == 9, 0.3 // 0.1 == 2)
    assert concurrent_tasks({"CPU": 1}, 0.1, 0) == 10
    assert concurrent_tasks({"CPU": 0.3}, 0.1, 0) == 3
    assert concurrent_tasks({"CPU": 16, "GPU": 0.3}, 1, 0.1) == 3
    assert task_device("auto", 0.25) == "cuda" and task_device(None, 0) == "cpu"
    with pytest.raises(RayBackendError, match="--device cuda with --backend ray needs --gpus-per-task"):
        task_device("cuda", 0)
    with pytest.raises(RayBackendError, match="got 'cuda:1'"):
        task_device("cuda:1", 1)


def test_ray_flags_need_the_ray_backend(tmp_path, capsys):
    from deep.__main__ import main

    assert main(["sweep", "--benchmark", "synthetic", "--out", str(tmp_path / "r.csv"),
                 "--gpus-per-task", "1"]) == 2
    assert "error: --gpus-per-task given without --backend ray" in capsys.readouterr().err
    assert main(["bench", "fmnist", "--quick", "--out", str(tmp_path), "--no-progress",
                 "--ray-address", "auto"]) == 2
    assert "error: --ray-address given without --backend ray" in capsys.readouterr().err


def test_local_workers_are_refused_with_the_ray_backend(tmp_path, capsys):
    """--workers would be silently ignored under Ray: an error, before Ray starts."""
    from deep.__main__ import main

    assert main(["sweep", "--benchmark", "synthetic", "--out", str(tmp_path / "r.csv"),
                 "--backend", "ray", "--workers", "2"]) == 2
    assert "error: --workers starts processes on this machine" in capsys.readouterr().err
    assert main(["bench", "fmnist", "--quick", "--out", str(tmp_path), "--no-progress",
                 "--backend", "ray", "--workers", "4"]) == 2
    assert "drop --workers" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_running_out_of_gpu_memory_names_the_node_and_the_remedy(monkeypatch):
    """A task group's CUDA out-of-memory error (a RuntimeError, so not retried and not
    wrapped as a data error) reaches the driver as a TaskGroupError naming the node."""
    import deep.ray_backend as backend

    def out_of_memory(cells, **spec):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield  # a generator, as run_group is

    monkeypatch.setattr(backend, "run_group", out_of_memory)
    cells = plan_cells(load_protocol("synthetic"))[:2]
    with pytest.raises(TaskGroupError, match=r"ran out of GPU memory on node \S+: give each task "
                                             r"group a larger GPU share \(--gpus-per-task\)"):
        list(backend.run_group_task(cells, {}, {}, threads=1))


def test_bad_options_are_named():
    with pytest.raises(RayBackendError, match="must be 'auto' or HOST:PORT, got 'localhost'"):
        RayOptions(address="localhost")
    with pytest.raises(RayBackendError, match="must be 'auto' or HOST:PORT, got 'head:0'"):
        RayOptions(address="head:0")
    with pytest.raises(RayBackendError, match="--gpus-per-task must be >= 0"):
        RayOptions(gpus_per_task=-1)
    with pytest.raises(RayBackendError, match="--cpus-per-task must be > 0"):
        RayOptions(cpus_per_task=0)


def test_what_ray_refuses_later_is_refused_with_the_options():
    """Ray raises these (as a traceback) only once a task is submitted, after it started."""
    with pytest.raises(RayBackendError, match=r"--gpus-per-task 1.5: Ray reserves a share of one "
                                              r"GPU \(0.5, 0.25, ...\) or whole GPUs"):
        RayOptions(gpus_per_task=1.5)
    with pytest.raises(RayBackendError, match="--gpus-per-task 1e-05: Ray counts resources in "
                                              "steps of 0.0001"):
        RayOptions(gpus_per_task=0.00001)
    with pytest.raises(RayBackendError, match="--cpus-per-task must be a finite number, got inf"):
        RayOptions(cpus_per_task=float("inf"))
    RayOptions(gpus_per_task=2, cpus_per_task=1.5)  # whole GPUs; any share of CPUs (Ray's rules)
    RayOptions(gpus_per_task=0.25, cpus_per_task=0.5)


def test_a_ray_client_address_is_refused_with_what_to_give_instead():
    # ray:// needs ray[client] and another port; the sweep connects to the GCS address
    with pytest.raises(RayBackendError, match=r"--ray-address ray://head:10001: .*not through Ray "
                                              r"Client .*HOST:PORT .*6379.*--ray-address auto"):
        RayOptions(address="ray://head:10001")


def test_option_errors_come_before_ray_connects(tmp_path):
    """Errors of --device and --gpus-per-task need no cluster: they come before Ray
    connects (or starts a local instance, seconds). An address where nothing listens
    shows the order: connecting first would raise its error instead."""
    cells = plan_cells(protocol(SMALL))
    nowhere = f"127.0.0.1:{free_port()}"
    for device, gpus, message in (
            ("cpu", 1, "--device cpu with --gpus-per-task 1 reserves GPUs"),
            ("cuda", 0, "--device cuda with --backend ray needs --gpus-per-task > 0"),
            ("cuda:0", None, "--backend ray runs on --device auto, cpu or cuda .* got 'cuda:0'")):
        executor = on_ray(address=nowhere, gpus_per_task=gpus)
        with pytest.raises(RayBackendError, match=message):
            executor(cells, {"device": device}, lambda row: None)
    assert not ray.is_initialized()
    # a data folder given to the synthetic benchmark (which reads none): a task's error,
    # found after Ray had connected (or started), before
    from deep.data import DataError
    with pytest.raises(DataError, match="synthetic is generated in memory and reads no folder"):
        run_sweep(protocol(SMALL), tmp_path / "r.csv", data_dir=str(tmp_path), progress=False,
                  executor=on_ray(address=nowhere))
    assert not ray.is_initialized() and not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("flags, message", [
    (["--backend", "ray", "--device", "cuda:1"], "--backend ray runs on --device auto, cpu or cuda"),
    (["--backend", "ray", "--device", "cpu", "--gpus-per-task", "0.5"],
     "--device cpu with --gpus-per-task 0.5 reserves GPUs"),
    (["--backend", "ray", "--cpus-per-task", "0"], "--cpus-per-task"),
    pytest.param(["--backend", "ray", "--gpus-per-task", "1"],
                 "--gpus-per-task 1 on a local Ray instance, but torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    # before: Ray started, then asked for --gpus-per-task, which then found no GPU
    pytest.param(["--backend", "ray", "--device", "cuda"],
                 "--device cuda on a local Ray instance, but torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    (["--backend", "ray", "--workers", "2"], "drop --workers"),
    (["--device", "bogus"], "device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bench_checks_its_flags_before_it_makes_a_folder_or_starts_ray(tmp_path, capsys,
                                                                        flags, message):
    from deep.__main__ import main

    out = tmp_path / "suite"
    assert main(["bench", "fmnist", "--quick", "--out", str(out), "--no-progress", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not ray.is_initialized()


def test_no_node_that_holds_a_task_group_is_an_error():
    def node(cpus, gpus, address, alive=True):
        return {"Alive": alive, "NodeManagerAddress": address,
                "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    two_small = [node(1, 1, "10.0.0.1"), node(1, 1, "10.0.0.2"), node(64, 8, "10.0.0.9", False)]
    check_a_node_fits(two_small, 1, 1)
    check_a_node_fits(two_small, 0.5, 0.5)
    with pytest.raises(RayBackendError, match=r"no node of the Ray cluster can hold a task group "
                                              r"\(--cpus-per-task 2; a task runs on one node\): "
                                              r"the largest \(10.0.0.1\) has 1 CPUs and 1 GPUs"):
        check_a_node_fits(two_small, 2, 0)  # (the dead node does not count)
    with pytest.raises(RayBackendError, match=r"\(--cpus-per-task 1 and --gpus-per-task 2; .*"
                                              r"the largest \(10.0.0.8\) has 2 CPUs and 1 GPUs"):
        check_a_node_fits([node(4, 0, "10.0.0.7"), node(2, 1, "10.0.0.8")], 1, 2)
    check_a_node_fits([node(0.3, 0, "10.0.0.7")], 0.1 + 0.2, 0)  # Ray's fixed point, not floats


def test_every_node_is_probed_for_the_data_also_nodes_that_share_an_address():
    """Two nodes on one host (two `slurmd`s, host-network containers, `ray start` twice)
    share an address: keyed by it, only the last was probed, and a node without the
    folder went unnoticed until its task group failed. Ray stands in by a fake here that
    answers each probe by the node it is pinned to."""
    ids = {"a" * 56: True, "b" * 56: False}       # node b cannot see the folder
    problems = {}                                  # node -> its shift-file problem

    class Probe:
        def options(self, scheduling_strategy):
            self.node = scheduling_strategy.node_id
            return self

        def remote(self, data_dir, benchmark, shifts):
            return ("host", ids[self.node], problems.get(self.node))

    class FakeRay:
        def nodes(self):
            return [{"Alive": True, "NodeID": node, "NodeManagerAddress": "10.0.0.1",
                     "Resources": {"CPU": 2}} for node in ids]

        def remote(self, **options):
            return lambda function: Probe()

        def get(self, ref):
            return ref

    with pytest.raises(RayBackendError, match=r"is not a folder on node\(s\) host \(10.0.0.1, "
                                              r"node bbbbbbbb\);"):
        check_data_dir(FakeRay(), "/data", 1, 0)
    ids["b" * 56] = True
    check_data_dir(FakeRay(), "/data", 1, 0)
    problems["a" * 56] = "cifar10c: 1 of the 2 corruptions to run have no file in /data: fog.npy"
    with pytest.raises(RayBackendError, match=r"^on node\(s\) host \(10.0.0.1, node aaaaaaaa\): "
                                              r"cifar10c: 1 of the 2 .*: fog.npy$"):
        check_data_dir(FakeRay(), "/data", 1, 0)


def test_the_cluster_line_says_where_auto_pointed():
    """It printed "ray: cluster at auto: ..."."""
    from deep.ray_backend import cluster_line

    class Context:
        gcs_address = "10.0.0.5:6379"

    class FakeRay:
        def nodes(self):
            return [{"Alive": True}, {"Alive": False}]

        resources = {"CPU": 8.0}

        def cluster_resources(self):
            return self.resources

        def get_runtime_context(self):
            return Context()

    assert cluster_line(FakeRay(), "auto") == "ray: cluster at 10.0.0.5:6379: 1 node, 8 CPUs, 0 GPUs"
    assert cluster_line(FakeRay(), "head:6380").startswith("ray: cluster at head:6380: ")
    assert cluster_line(FakeRay(), None).startswith("ray: local instance: ")
    FakeRay.resources = {"CPU": 1.0, "GPU": 1.0}  # (one of each: no plural s)
    assert cluster_line(FakeRay(), "h:1") == "ray: cluster at h:1: 1 node, 1 CPU, 1 GPU"
    FakeRay.resources = {"CPU": 0.5, "GPU": 2.0}
    assert cluster_line(FakeRay(), "h:1") == "ray: cluster at h:1: 1 node, 0.5 CPUs, 2 GPUs"


def test_without_an_address_a_local_instance_starts_even_where_ray_start_left_one(
        tmp_path, synthetic_cache):
    """`ray start` leaves its address in <ray temp dir>/ray_current_cluster, and plain
    ray.init() connects there: once that cluster is gone it waits (a CI run hung on it).
    Without --ray-address the sweep starts its own instance, as its help says."""
    marker = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "ray_current_cluster"
    saved = marker.read_bytes() if marker.exists() else None
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"127.0.0.1:{free_port()}")  # a cluster that is not there
    try:
        done = subprocess.run(
            [sys.executable, "-m", "deep", "sweep", "--benchmark", "synthetic", "--shifts", "noise",
             "--methods", "last", "--lrs", "0.01", "--seeds", "0", "--epochs", "1",
             "--n-target", "64", "--val-per-class", "10", "--test-per-class", "20",
             "--out", str(tmp_path / "r.csv"), "--backend", "ray"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=240)
    finally:
        if saved is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_bytes(saved)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray: local instance: 1 node" in done.stderr and "ran 1 cells" in done.stdout
    # the progress bar starts once Ray is up: its wait is set-up, not the first cell
    assert done.stderr.index("ray: local instance") < done.stderr.index("sweep synthetic:"), \
        done.stderr[-3000:]


def finished_within(seconds: float, call) -> BaseException | None:
    """What `call()` raised (None: nothing), failing the test if it has not returned
    after `seconds`: Ray waits forever on what these tests check."""
    outcome = []

    def run():
        try:
            call()
            outcome.append(None)
        except BaseException as err:  # handed to the test
            outcome.append(err)

    waiter = threading.Thread(target=run, daemon=True)
    waiter.start()
    waiter.join(seconds)
    assert outcome, f"still waiting after {seconds} s: Ray would wait forever"
    return outcome[0]


def sweep_cli(*flags, env=None, timeout=300):
    """`python -m deep sweep` of one synthetic cell with --backend ray and `flags`,
    killed (with anything it started) if it runs past `timeout`."""
    command = [sys.executable, "-m", "deep", "sweep", "--benchmark", "synthetic", "--shifts",
               "noise", "--methods", "last", "--lrs", "0.01", "--seeds", "0", "--epochs", "1",
               "--n-target", "64", "--val-per-class", "10", "--test-per-class", "20",
               "--no-progress", "--backend", "ray", *flags]
    return run_bounded(command, {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                 **(env or {})}, timeout)


def run_bounded(command, env, timeout) -> subprocess.CompletedProcess:
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{command[:4]} still running after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_an_address_where_nothing_listens_is_an_error_not_a_wait(tmp_path):
    """ray.init retries such an address forever ("Failed to connect to GCS" every 30 s)."""
    nowhere = f"127.0.0.1:{free_port()}"
    done = sweep_cli("--out", str(tmp_path / "r.csv"), "--ray-address", nowhere, timeout=90)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (f"error: no Ray head answers at {nowhere}: [Errno 111] Connection refused. Check "
            "that the head runs (`ray status` on it)") in done.stderr
    # "auto" where it points to a cluster that is gone (here through RAY_ADDRESS, which wins
    # over the address `ray start` left: deterministic while other Ray instances run)
    done = sweep_cli("--out", str(tmp_path / "r.csv"), "--ray-address", "auto",
                     env={"RAY_ADDRESS": nowhere}, timeout=90)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(r"error: no Ray head answers at \S+:\d+ \(where --ray-address auto points",
                     done.stderr), done.stderr[-3000:]


def test_auto_without_a_cluster_says_what_to_do(tmp_path, monkeypatch):
    """--ray-address auto with neither RAY_ADDRESS nor a `ray start` on this machine (whose
    address Ray keeps under its temp dir): our flags in the message, not Ray's."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(RayBackendError) as error:
        check_reachable("auto")
    assert str(error.value) == (
        "--ray-address auto found no running Ray cluster (RAY_ADDRESS is not set, and no "
        "`ray start` ran on this machine): start one with `ray start --head` and give its "
        "HOST:PORT, or drop --ray-address to start a local instance")


@pytest.mark.parametrize("greeting, said", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "it answered 'HTTP/1.1'"),  # e.g. the dashboard
    (None, "it sent nothing back")])
def test_an_address_where_something_else_listens_is_an_error_not_a_wait(greeting, said):
    """A port that takes connections but is not Ray's GCS (the dashboard's 8265): ray.init
    would wait on it forever, as on a dead one."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        conn, _ = server.accept()
        accepted.append(conn)
        conn.recv(64)
        if greeting is not None:
            conn.sendall(greeting)
    threading.Thread(target=serve, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(RayBackendError) as error:
        check_reachable(address)
    assert time.monotonic() - started < 10
    assert str(error.value) == (
        f"{address} takes connections but is not a Ray head's GCS port (which speaks gRPC; "
        f"{said}). Give the address `ray start --head` printed (port 6379 by default), not "
        "the dashboard's (8265) or another service's")
    server.close()


# --- two nodes of one CPU and one (declared) GPU each -----------------------------

@pytest.fixture(scope="class")
def two_small_nodes():
    """Two real Ray nodes on this machine (ray.cluster_utils), this process connected.
    Their GPU is declared only: nothing here runs on it."""
    from ray.cluster_utils import Cluster

    temp = short_temp_dir()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 1, "include_dashboard": False, "temp_dir": temp})
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.usefixtures("two_small_nodes", "synthetic_checkpoint")
class TestTwoSmallNodes:
    """The cluster's totals (2 CPUs, 2 GPUs) hold a task group that no node holds:
    Ray would wait forever for a node that can run it."""

    @pytest.mark.parametrize("request_", [dict(cpus_per_task=2, gpus_per_task=0),
                                          dict(cpus_per_task=1, gpus_per_task=2)])
    def test_a_task_group_no_node_holds_is_an_error(self, tmp_path, request_):
        error = finished_within(60, lambda: run_sweep(
            protocol(SMALL), tmp_path / "r.csv", progress=False, executor=on_ray(**request_)))
        assert isinstance(error, RayBackendError), error
        assert "no node of the Ray cluster can hold a task group" in str(error)
        assert "has 1 CPUs and 1 GPUs" in str(error)
        assert read_results(tmp_path / "r.csv") == []


# --- the SLURM script's wait for its Ray nodes -------------------------------------

def test_the_slurm_script_stops_when_the_ray_head_does_not_start(tmp_path):
    """scripts/slurm_ray_sweep.sh outside SLURM: `srun` and `scontrol` are stand-ins
    that run the step here (one node, localhost); Ray is real. A head that fails to
    start (here: a GPU count it refuses) must end the job with an error, not a wait. The
    Ray steps start without Ray's 30-s drain on SIGTERM (the sweep has ended by then)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    (bin_dir / "srun").write_text(  # drop srun's own options, run the command
        f"#!/bin/bash\necho \"${{RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S-unset}} $*\" >> {tmp_path}/steps\n"
        "while [ $# -gt 0 ]; do case $1 in -w) shift 2;; -*) shift;; *) break;; "
        "esac; done\nexec \"$@\"\n")
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{RAY.parent}:{os.environ['PATH']}",
           "PROJECT": str(ROOT), "VENV": str(RAY.parent.parent), "SLURM_JOB_NODELIST": "localhost",
           "SLURM_CPUS_PER_TASK": "1", "SLURM_GPUS_ON_NODE": "none", "RAY_PORT": str(free_port()),
           "RAY_WAIT_S": "60"}
    env.pop("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", None)
    started = time.time()
    done = run_bounded(["bash", str(ROOT / "scripts" / "slurm_ray_sweep.sh"), "--benchmark",
                        "synthetic", "--quick", "--out", str(tmp_path / "r.csv")], env, 120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert ("error: the Ray head on localhost (" in done.stderr
            and "did not start or has stopped: ray start --head exited with status 2"
            in done.stderr), done.stderr[-3000:]
    assert time.time() - started < 60  # no wait for a deadline: the head's step had ended
    assert not (tmp_path / "r.csv").exists()
    head_step = [s for s in (tmp_path / "steps").read_text().splitlines() if " ray start " in s]
    assert len(head_step) == 1 and head_step[0].startswith("0 "), head_step


def test_the_slurm_script_names_a_python_without_ray(tmp_path):
    """A job whose environment lacks Ray (VENV wrong, not activated) stops at once with
    what to do, instead of waiting RAY_WAIT_S for nodes that cannot start."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 99\n")  # never reached
    (bin_dir / "python").write_text(  # a python without the project or Ray
        "#!/bin/bash\nexec /usr/bin/env -u PYTHONPATH python3 -S \"$@\"\n")
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "PROJECT": str(tmp_path),
           "VENV": str(tmp_path / "no-venv"), "SLURM_JOB_NODELIST": "localhost"}
    started = time.time()
    done = run_bounded(["bash", str(ROOT / "scripts" / "slurm_ray_sweep.sh"), "--benchmark",
                        "synthetic", "--quick", "--out", str(tmp_path / "r.csv")], env, 60)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"error: {bin_dir / 'python'} cannot import ray and deep (this project)" in done.stderr
    assert time.time() - started < 30


# --- a cluster started with `ray start --head`, sweeps through the command line ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="class")
def ray_head(synthetic_cache):
    """(address, env): a head started by `ray start --head --block`, with its own token;
    terminating the command stops every process it started."""
    port, temp = free_port(), short_temp_dir()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in head.stdout:  # it prints "... --block" once the node is up
        log.append(line)
        if "--block" in line or head.poll() is not None:
            break
    assert head.poll() is None, "ray start --head failed:\n" + "".join(log)
    threading.Thread(target=head.stdout.read, daemon=True).start()  # keep its pipe drained
    yield f"{socket.gethostbyname(socket.gethostname())}:{port}", env
    head.terminate()
    head.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)


def sweep_command(out, address, *flags):
    return [sys.executable, "-m", "deep", "sweep", "--benchmark", "synthetic", *LONG_FLAGS,
            "--no-progress", "--out", str(out), "--backend", "ray", "--ray-address", address,
            *flags]


class TestRayStartHead:
    def test_a_driver_killed_and_restarted_resumes(self, tmp_path, reference, ray_head):
        address, env = ray_head
        out = tmp_path / "ray.csv"
        # A head of one CPU: one task group of six cells, whose rows must reach the CSV
        # one by one (a group written at its end would be lost whole). (Two CPUs and
        # --cpus-per-task 2 gave the same, with two torch threads: beside one busy thread
        # of the other pytest worker on two cores, 10 times slower, 250 s in a CI run.)
        command = sweep_command(out, address)
        driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        deadline, group_running = time.time() + 400, []
        while time.time() < deadline and driver.poll() is None:
            if out.exists() and len(read_results(out)) >= 2:
                group_running = own_ray_workers("run_group_task")  # (the head is our child)
                break
            time.sleep(0.01)
        assert driver.poll() is None, f"the sweep ended before it was killed: {driver.communicate()}"
        assert group_running, "rows reached the CSV only after their task group had ended"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed = read_results(out)  # every row parses: nothing half-written
        assert 2 <= len(killed) < 6 and len(by_key(killed)) == len(killed)

        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        assert f"ran {6 - len(killed)} cells" in done.stdout
        assert f"skipped {len(killed)} already finished" in done.stdout
        rows = read_results(out)
        assert len(rows) == 6 and {row_key(r) for r in rows} == {c.key for c in plan_cells(protocol(LONG))}
        assert by_key(rows) == reference["long"]
        # the driver says what it connected to
        assert f"ray: cluster at {address}: 1 node, 1 CPU, 0 GPUs" in done.stderr

    def test_a_data_dir_no_node_sees_is_one_line(self, tmp_path, ray_head):
        address, env = ray_head
        # (a benchmark that reads a folder: synthetic refuses any, before Ray connects)
        command = [sys.executable, "-m", "deep", "sweep", "--benchmark", "fmnist-c", "--quick",
                   "--no-progress", "--out", str(tmp_path / "r.csv"), "--backend", "ray",
                   "--ray-address", address, "--data-dir", str(tmp_path / "nowhere")]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2
        assert f"error: --data-dir {tmp_path / 'nowhere'} is not a folder on node(s)" in done.stderr


def test_the_driver_resolves_a_default_data_folder_for_the_nodes(monkeypatch, tmp_path):
    """$FASHION_MNIST_DIR set in the driver's shell is not set on Ray's nodes: the driver
    passes the folder it resolved (then checked on every node like --data-dir)."""
    from deep.ray_backend import driver_data_dir
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    assert driver_data_dir("fmnist-c") == str(tmp_path)
    monkeypatch.delenv("FASHION_MNIST_DIR")
    assert driver_data_dir("fmnist-flip") == "/usr/share/datasets/fashion-mnist"
    assert driver_data_dir("synthetic") is None  # generated in memory: no folder
    assert driver_data_dir("cifar10c") is None   # --data-dir is required there


# --- stopping task groups, against a stand-in for Ray ------------------------------------

class Group:
    """A task group that ignores its first `lost` cancels (delivering a row each time it is
    asked meanwhile), then ends."""

    def __init__(self, lost: int):
        self.lost, self.cancels = lost, 0

    def __next__(self):
        return self


class StandInRay:
    def cancel(self, group, force):
        assert force
        group.cancels += 1

    def wait(self, groups, num_returns, timeout):
        time.sleep(0.01)
        return list(groups), []

    def get(self, group):
        if group.cancels > group.lost:
            raise RuntimeError("cancelled")  # what ray.get raises for a cancelled task
        return {"a": "row"}


def test_stopping_cancels_each_group_until_it_ends(capsys):
    groups = [Group(lost=0), Group(lost=3)]
    stop_groups(StandInRay(), list(groups))
    assert [g.cancels for g in groups] == [1, 4]
    assert capsys.readouterr().err == ""


def test_a_group_that_will_not_stop_is_named_after_the_patience(capsys):
    started = time.monotonic()
    stop_groups(StandInRay(), [Group(lost=0), Group(lost=10**9)], patience_s=0.5)
    assert time.monotonic() - started < 5
    assert "warning: 1 task group(s) still ran 0.5 s after the sweep stopped" in capsys.readouterr().err


def test_a_row_a_retried_group_delivers_again_is_recorded_once():
    # Guards recording every delivery: a retried group re-runs cells Ray already delivered.
    from deep.ray_backend import _take_next
    from deep.results import KEY
    row = dict.fromkeys(KEY, 0)
    group = iter([row, dict(row)])
    running = {group: [types.SimpleNamespace(key=row_key(row))]}
    stand_in = types.SimpleNamespace(get=lambda delivered: delivered)
    recorded, written = [], set()
    for _ in range(2):
        _take_next(stand_in, group, running, written, recorded.append)
    assert recorded == [row]


@pytest.mark.parametrize("failure", [Exception("The current node timed out during startup."),
                                     ConnectionError("GCS did not answer")])
def test_a_local_ray_that_does_not_start_is_one_error_that_says_what_to_do(monkeypatch, failure):
    # Seen on a shared machine: another Ray's /tmp/ray got in the way and the sweep ended
    # in a traceback (or in "cannot connect to the Ray cluster at None").
    import ray
    from deep.ray_backend import RaySession

    def fail(*args, **kwargs):
        raise failure
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fail)
    with pytest.raises(RayBackendError, match=r"the local Ray instance did not start: "
                                              + str(failure).rstrip(".") + r"\. .*RAY_TMPDIR"):
        with RaySession():
            pass
