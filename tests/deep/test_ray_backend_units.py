"""The Ray backend's driver logic against stand-ins for Ray: no Ray starts here.

What the tests of test_ray_backend.py check on a real cluster (minutes), one claim each
here in well under a second: the options a task group is submitted with, what the
driver does with each group's rows and failures, how it connects and disconnects, which
nodes it probes for the data folder, and the wiring of the executor. Expected values are
written out by hand.
"""

from __future__ import annotations

import argparse
import socket
import struct
import threading
import types

import pytest
import ray
import torch

import deep.ray_backend as backend
from deep.protocol import load_protocol
from deep.ray_backend import (RayBackendError, RayExecutor, RayOptions, TaskGroupError,
                               check_data_dir, check_reachable, concurrent_tasks,
                               execute_groups_on_ray,
                               options_from_args, run_group_task)
from deep.sweep import plan_cells, row_key

# Two shifts x two methods: two task groups of two cells.
SMALL = dict(shifts=["noise", "flip"], methods=["first", "last"], lrs=[1e-2], seeds=[0],
             epochs=2, n_target=64, val_per_class=10, test_per_class=20)


def small_cells():
    return plan_cells(load_protocol("synthetic").replace(**SMALL))


def row_of(cell) -> dict:
    return {"benchmark": cell.benchmark, "shift": cell.shift, "method": cell.method,
            "seed": cell.seed, "n_target": cell.n_target, "lr": cell.lr}


# --- a stand-in for Ray's tasks: generators of rows ------------------------------------

class Failed(Exception):
    """Stands in for ray.exceptions.RayTaskError: what ray.get raises for a task's error."""

    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause


class Generator:
    """A task group's Ray generator: each `next` gives what `ray.get` turns into a row
    (or raises); once cancelled it has ended."""

    def __init__(self, items):
        self.items, self.cancelled = iter(items), 0

    def __next__(self):
        if self.cancelled:
            raise StopIteration
        return next(self.items)


class StandInRay:
    """ray.remote / put / wait / get / cancel for `execute_groups_on_ray`: group i's task
    delivers `outcomes[i]` (rows, or exceptions that `get` raises) in turn."""

    exceptions = types.SimpleNamespace(RayTaskError=Failed)

    def __init__(self, outcomes):
        self.outcomes, self.options, self.submitted, self.generators = list(outcomes), None, [], []
        self.waits = 0

    def remote(self, **options):
        self.options = options
        return lambda function: types.SimpleNamespace(remote=self._submit)

    def _submit(self, group, spec, weights, threads):
        self.submitted.append((group, spec, weights, threads))
        generator = Generator(self.outcomes[len(self.generators)])
        self.generators.append(generator)
        return generator

    def put(self, value):
        return ("in the object store", value)

    def wait(self, refs, num_returns, timeout=None):
        self.waits += 1
        assert self.waits < 100, "the driver waits on and on"
        return list(refs[:num_returns]), list(refs[num_returns:])

    def get(self, item):
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self, generator, force):
        assert force
        generator.cancelled += 1


def run_on(stand_in, groups, record, options=RayOptions(), gpus=0.0):
    execute_groups_on_ray(stand_in, groups, {"device": "cpu"}, record, {"w": 1}, options, gpus)


def test_a_task_group_is_submitted_with_its_cpus_gpus_retries_and_a_fresh_gpu_worker():
    cells = small_cells()
    stand_in = StandInRay([[], []])
    run_on(stand_in, [cells[:2], cells[2:]], lambda row: None,
           RayOptions(cpus_per_task=2.5, max_retries=2), gpus=0.5)
    assert stand_in.options == {"num_cpus": 2.5, "num_gpus": 0.5, "max_retries": 2,
                                "retry_exceptions": False, "max_calls": 1}
    # the weights go to the object store once; torch threads: the whole CPUs reserved
    assert [(g, w, t) for g, _, w, t in stand_in.submitted] == [
        (cells[:2], ("in the object store", {"w": 1}), 2),
        (cells[2:], ("in the object store", {"w": 1}), 2)]


def test_a_cpu_task_group_keeps_its_worker_and_runs_one_thread_on_a_share_of_a_cpu():
    stand_in = StandInRay([[]])
    run_on(stand_in, [small_cells()[:2]], lambda row: None, RayOptions(cpus_per_task=0.5))
    assert stand_in.options == {"num_cpus": 0.5, "num_gpus": 0.0, "max_retries": 3,
                                "retry_exceptions": False}
    assert stand_in.submitted[0][3] == 1


def test_every_row_is_recorded_once_and_the_sweep_ends_when_every_group_has_ended():
    cells = small_cells()
    rows = [row_of(c) for c in cells]
    recorded = []
    # the second group's first row comes twice (a retried group runs its cells again)
    run_on(StandInRay([rows[:2], [rows[2], dict(rows[2]), rows[3]]]),
           [cells[:2], cells[2:]], recorded.append)
    assert len(recorded) == 4 and sorted(map(row_key, recorded)) == sorted(map(row_key, rows))


def test_a_row_of_a_cell_outside_its_group_is_an_error():
    cells = small_cells()
    with pytest.raises(RuntimeError, match=r"task group synthetic/noise seed 0 \(2 cells\) "
                                           r"returned a row of another cell"):
        run_on(StandInRay([[row_of(cells[2])]]), [cells[:2]], lambda row: None)


def test_a_failing_group_stops_the_groups_still_running_without_ray():
    cells = small_cells()
    healthy = [row_of(cells[2])] * 50
    stand_in = StandInRay([[Failed(TaskGroupError("task group x failed on node n: bad data"))],
                           healthy])
    with pytest.raises(TaskGroupError, match=r"^task group x failed on node n: bad data$"):
        run_on(stand_in, [cells[:2], cells[2:]], lambda row: None)
    assert [g.cancelled for g in stand_in.generators] == [0, 1]


def test_a_sweep_interrupted_on_the_driver_stops_its_running_groups():
    """Ctrl-C (KeyboardInterrupt, not an Exception) on the driver must not leave the
    cluster running the sweep's task groups."""
    cells = small_cells()
    stand_in = StandInRay([[row_of(cells[0])], [row_of(cells[2])]])

    def interrupted(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_on(stand_in, [cells[:2], cells[2:]], interrupted)
    assert [g.cancelled for g in stand_in.generators] == [1, 1]


def test_a_worker_death_after_the_retries_names_the_group_and_stops_the_sweep():
    cells = small_cells()
    stand_in = StandInRay([[ray.exceptions.WorkerCrashedError()], [row_of(cells[2])] * 50])
    with pytest.raises(TaskGroupError, match=r"^task group synthetic/noise seed 0 \(2 cells\): its "
                                             r"worker died and Ray's retries are used up "
                                             r"\(WorkerCrashedError; "):
        run_on(stand_in, [cells[:2], cells[2:]], lambda row: None)
    assert stand_in.generators[1].cancelled == 1


# --- the task itself --------------------------------------------------------------------

def test_a_task_group_runs_on_the_threads_it_was_given(monkeypatch):
    seen = []

    def run_group(cells, **spec):
        seen.append(torch.get_num_threads())
        yield {"row": 1}

    monkeypatch.setattr(backend, "run_group", run_group)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert list(run_group_task(small_cells()[:2], {}, {}, 3)) == [{"row": 1}]
    finally:
        torch.set_num_threads(threads)
    assert seen == [3]


def test_a_file_error_in_a_task_group_names_the_node_and_is_not_retried(monkeypatch):
    def run_group(cells, **spec):
        raise FileNotFoundError("no such file: /data/fog.npy")
        yield

    monkeypatch.setattr(backend, "run_group", run_group)
    with pytest.raises(TaskGroupError, match=r"^task group synthetic/noise seed 0 \(2 cells\) "
                                             rf"failed on node {socket.gethostname()}: no such "
                                             r"file: /data/fog\.npy$"):
        list(run_group_task(small_cells()[:2], {}, {}, 1))


# --- connecting -----------------------------------------------------------------------

class StandInModule:
    """The ray module as RaySession uses it."""

    def __init__(self, connected: bool):
        self.connected, self.calls = connected, []

    def is_initialized(self):
        return self.connected

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        self.connected = True

    def shutdown(self):
        self.calls.append(("shutdown",))
        self.connected = False

    def nodes(self):
        return [{"Alive": True}]

    def cluster_resources(self):
        return {"CPU": 2.0}


def test_a_session_starts_a_new_local_instance_and_stops_only_what_it_started(monkeypatch,
                                                                              capsys):
    stand_in = StandInModule(connected=False)
    monkeypatch.setattr(backend, "import_ray", lambda: stand_in)
    with backend.RaySession() as got:
        assert got is stand_in
    # address "local": not the cluster a past `ray start` left its address of
    assert stand_in.calls == [("init", {"address": "local", "include_dashboard": False}),
                              ("shutdown",)]
    assert capsys.readouterr().err == "ray: local instance: 1 node, 2 CPUs, 0 GPUs\n"
    # already connected (a bench suite's session): neither connects again nor disconnects
    stand_in = StandInModule(connected=True)
    monkeypatch.setattr(backend, "import_ray", lambda: stand_in)
    with backend.RaySession("head:6379"):
        pass
    assert stand_in.calls == [] and stand_in.connected


def test_a_session_checks_the_head_answers_before_ray_init_waits_on_it(monkeypatch, capsys):
    stand_in = StandInModule(connected=False)
    monkeypatch.setattr(backend, "import_ray", lambda: stand_in)
    monkeypatch.setattr(backend, "check_reachable", lambda a: stand_in.calls.append(("check", a)))
    with backend.RaySession("head:6379"):
        pass
    assert stand_in.calls == [("check", "head:6379"), ("init", {"address": "head:6379"}),
                              ("shutdown",)]
    assert capsys.readouterr().err == "ray: cluster at head:6379: 1 node, 2 CPUs, 0 GPUs\n"


def test_a_head_that_refuses_the_driver_is_one_error_and_other_errors_pass_unchanged(
        monkeypatch):
    stand_in = StandInModule(connected=False)
    monkeypatch.setattr(backend, "import_ray", lambda: stand_in)
    monkeypatch.setattr(backend, "check_reachable", lambda address: None)

    def refused(**kwargs):
        raise ConnectionError("Could not connect to the GCS.")

    stand_in.init = refused
    with pytest.raises(RayBackendError, match=r"^cannot connect to the Ray cluster at head:6379: "
                                              r"Could not connect to the GCS\. Is `ray start`"):
        with backend.RaySession("head:6379"):
            pass

    def broken(**kwargs):
        raise RuntimeError("a bug in Ray")

    stand_in.init = broken
    with pytest.raises(RuntimeError, match="^a bug in Ray$"):
        with backend.RaySession("head:6379"):
            pass


def test_a_bench_suite_holds_one_ray_session_for_its_sweeps():
    session = backend.session_for(RayExecutor(RayOptions(address="head:6379")))
    assert isinstance(session, backend.RaySession) and session.address == "head:6379"
    assert not isinstance(backend.session_for(None), backend.RaySession)


def test_the_driver_reads_the_weights_without_trusting_the_checkpoint_unless_asked(monkeypatch):
    read = []
    monkeypatch.setattr(backend, "pretrained_state", lambda *args: read.append(args) or {})
    spec = {"protocol": load_protocol("synthetic"), "checkpoint": "source.pt"}
    backend.pretrained_weights(spec)
    backend.pretrained_weights(dict(spec, trust_checkpoint=True))
    assert [(args[0], args[-1]) for args in read] == [("source.pt", False), ("source.pt", True)]


def serve_once(reply: bytes) -> str:
    """HOST:PORT of a server that answers its first connection with `reply`."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.recv(64)
            conn.sendall(reply)
            conn.recv(64)  # until the client closes
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


# A gRPC server's first frame: 9 bytes, length 0, type 4 (SETTINGS), flags 0, stream 0.
SETTINGS_FRAME = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def test_a_port_that_answers_as_a_grpc_server_passes_the_check():
    check_reachable(serve_once(SETTINGS_FRAME))


def test_a_port_that_resets_the_connection_is_called_not_a_gcs_port_at_once(monkeypatch):
    """A service that drops the HTTP/2 preface with a reset has answered: not a dead
    address to try again (three tries, then "no Ray head answers")."""
    server = socket.create_server(("127.0.0.1", 0))

    def reset():
        conn, _ = server.accept()
        conn.recv(64)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # linger 0: a reset, not an orderly close
        server.close()

    threading.Thread(target=reset, daemon=True).start()
    monkeypatch.setattr(backend, "time", types.SimpleNamespace(sleep=lambda s: None))
    address = f"127.0.0.1:{server.getsockname()[1]}"
    with pytest.raises(RayBackendError, match=rf"^{address} takes connections but is not a Ray "
                                              r"head's GCS port \(which speaks gRPC; it sent "
                                              r"nothing back\)"):
        check_reachable(address)


def test_a_head_still_starting_is_tried_again_before_the_address_is_called_wrong(monkeypatch):
    address = serve_once(SETTINGS_FRAME)
    connect, tries = socket.create_connection, []

    def refused_first(*args):
        tries.append(args[0])
        if len(tries) == 1:
            raise ConnectionRefusedError(111, "Connection refused")
        return connect(*args)

    monkeypatch.setattr(backend.socket, "create_connection", refused_first)
    monkeypatch.setattr(backend, "time", types.SimpleNamespace(sleep=lambda s: None))
    check_reachable(address)
    assert len(tries) == 2


def test_task_groups_are_counted_in_rays_fixed_point_not_truncated_floats():
    # 0.57 CPUs hold 57 groups of 0.01 (0.57 * 10_000 is 5699.99... in floats)
    assert concurrent_tasks({"CPU": 0.57}, 0.01, 0) == 57


# --- options --------------------------------------------------------------------------

def test_options_ray_accepts_are_accepted():
    RayOptions(max_retries=0)  # no retry: a worker death stops the sweep at once
    RayOptions(cpus_per_task=0.0001, gpus_per_task=0.0001)  # Ray's smallest step
    RayOptions(address="head:65535")
    RayOptions(address="[::1]:6379")


@pytest.mark.parametrize("address", ["head:65536", ":6379", "head:port"])
def test_an_address_that_is_not_host_port_is_refused(address):
    with pytest.raises(RayBackendError, match=f"must be 'auto' or HOST:PORT, got '{address}'"):
        RayOptions(address=address)


def flags(**given):
    values = dict(backend="local", ray_address=None, gpus_per_task=None, cpus_per_task=1,
                  workers=None)
    return argparse.Namespace(**{**values, **given})


def test_the_ray_flags_reach_the_options_and_retries_default_to_three():
    # three: docs/distributed.md, "Ray re-runs the task group (up to 3 times)"
    assert options_from_args(flags(backend="ray", ray_address="head:6379", gpus_per_task=0.5,
                                   cpus_per_task=2)) == RayOptions(
        address="head:6379", gpus_per_task=0.5, cpus_per_task=2, max_retries=3)
    assert options_from_args(flags()) is None


def test_cpus_per_task_without_the_ray_backend_is_refused():
    with pytest.raises(RayBackendError, match=r"^--cpus-per-task given without --backend ray"):
        options_from_args(flags(cpus_per_task=4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_gpus_per_task_with_a_cluster_address_is_left_to_the_cluster():
    """No GPU on the driver's machine says nothing of a remote cluster's nodes."""
    RayExecutor(RayOptions(address="head:6379", gpus_per_task=1)).check_options("cuda")
    with pytest.raises(RayBackendError, match="--gpus-per-task 1 on a local Ray instance"):
        RayExecutor(RayOptions(gpus_per_task=1)).check_options("auto")


# --- the data folder on the nodes -----------------------------------------------------

def test_the_data_folder_is_probed_on_the_live_nodes_that_can_hold_a_task_group():
    """A node too small for a task group (or dead) runs none: its lack of the folder is
    no error, and it is not probed. Nodes at different addresses are named by address."""
    ids = {name: f"{i:056x}" for i, name in enumerate(["big", "small", "tiny", "dead", "big2"], 1)}
    names = {node_id: name for name, node_id in ids.items()}
    probed, without_folder = [], set()

    class Probe:
        def options(self, scheduling_strategy):
            assert scheduling_strategy.soft is False  # on that node, not elsewhere
            self.node = names[scheduling_strategy.node_id]
            return self

        def remote(self, data_dir, benchmark, shifts):
            probed.append((self.node, data_dir, benchmark, shifts))
            return ("host-" + self.node, self.node not in without_folder, None)

    def node(name, address, cpus, gpus, alive=True):
        return {"Alive": alive, "NodeID": ids[name], "NodeManagerAddress": address,
                "Resources": {"CPU": cpus, "GPU": gpus}}

    class StandIn:
        def nodes(self):
            return [node("big", "10.0.0.1", 4, 1), node("small", "10.0.0.2", 4, 0),
                    node("tiny", "10.0.0.3", 1, 1), node("dead", "10.0.0.4", 8, 8, alive=False),
                    node("big2", "10.0.0.5", 8, 2)]

        def remote(self, **options):
            assert options == {"num_cpus": 0}  # a probe needs no share of the node
            return lambda function: Probe()

        def get(self, ref):
            return ref

    without_folder.update({"small", "tiny", "dead"})
    check_data_dir(StandIn(), "/data", 2, 1, "--data-dir", "cifar10c", ("fog", "snow"))
    assert probed == [("big", "/data", "cifar10c", ("fog", "snow")),
                      ("big2", "/data", "cifar10c", ("fog", "snow"))]
    without_folder.add("big2")
    with pytest.raises(RayBackendError, match=r"^--data-dir /data is not a folder on node\(s\) "
                                              r"host-big2 \(10\.0\.0\.5\); every node"):
        check_data_dir(StandIn(), "/data", 2, 1)


# --- the executor's wiring ------------------------------------------------------------

def run_executor(monkeypatch, resources: dict, options: RayOptions, spec: dict,
                 nodes: int = 1) -> dict:
    """What `RayExecutor(options)` passes on, for a cluster of `resources` in all, in
    `nodes` equal nodes."""
    calls = {}

    class Cluster:
        def cluster_resources(self):
            return dict(resources)

        def nodes(self):
            return [{"Alive": True, "NodeID": f"{i:056x}", "NodeManagerAddress": f"10.0.0.{i}",
                     "Resources": {k: v / nodes for k, v in resources.items()}}
                    for i in range(1, nodes + 1)]

    cluster = calls["cluster"] = Cluster()
    monkeypatch.setattr(backend, "RaySession", lambda address: _Holding(cluster))
    monkeypatch.setattr(backend, "check_data_dir", lambda *a: calls.setdefault("data", a))
    monkeypatch.setattr(backend, "pretrained_weights", lambda spec: {"w": 1})
    monkeypatch.setattr(backend, "execute_groups_on_ray",
                        lambda *a: calls.setdefault("execute", a))
    RayExecutor(options)(small_cells(), spec, lambda row: None)
    return calls


def test_the_executor_splits_groups_for_free_slots_and_sends_the_data_folder_absolute(
        monkeypatch, tmp_path):
    """Four CPUs at one CPU a group: four slots, so the two groups of two cells are split
    into four of one. The data folder given relative to the driver's folder reaches the
    nodes absolute, checked there with the shifts of the sweep."""
    monkeypatch.chdir(tmp_path)
    spec = {"device": None, "data_dir": "data", "protocol": load_protocol("synthetic")}
    calls = run_executor(monkeypatch, {"CPU": 4.0}, RayOptions(address="head:6379"), spec)
    assert calls["data"] == (calls["cluster"], str(tmp_path / "data"), 1, 0.0, "--data-dir",
                             "synthetic", ("flip", "noise"))
    ray_, groups, task_spec, _, weights, _, gpus = calls["execute"]
    assert ray_ is calls["cluster"] and weights == {"w": 1} and gpus == 0.0
    assert task_spec["device"] == "cpu" and task_spec["data_dir"] == str(tmp_path / "data")
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1]


def test_the_executor_sizes_the_sweep_by_the_gpus_it_defaults_to(monkeypatch, tmp_path):
    """Eight CPUs and two GPUs, no --gpus-per-task: one GPU a group, so two slots (the
    GPUs bind): two groups of two cells, run on cuda; the data check asks for nodes with
    a GPU."""
    spec = {"device": "auto", "data_dir": str(tmp_path), "protocol": load_protocol("synthetic")}
    calls = run_executor(monkeypatch, {"CPU": 8.0, "GPU": 2.0},
                         RayOptions(address="head:6379", cpus_per_task=2), spec)
    assert calls["data"][2:4] == (2, 1.0)
    _, groups, task_spec, _, _, options, gpus = calls["execute"]
    assert gpus == 1.0 and task_spec["device"] == "cuda" and options.cpus_per_task == 2
    assert sorted(len(g) for g in groups) == [2, 2]


def test_the_executor_refuses_a_task_group_that_only_the_clusters_totals_hold(monkeypatch):
    """Two nodes of two CPUs, four CPUs a group: Ray would wait forever."""
    spec = {"device": "cpu", "protocol": load_protocol("synthetic")}
    with pytest.raises(RayBackendError, match=r"no node of the Ray cluster can hold a task group "
                                              r"\(--cpus-per-task 4; .*has 2 CPUs and 0 GPUs"):
        run_executor(monkeypatch, {"CPU": 4.0}, RayOptions(address="h:1", cpus_per_task=4),
                     spec, nodes=2)


class _Holding:
    def __init__(self, ray_):
        self.ray = ray_

    def __enter__(self):
        return self.ray

    def __exit__(self, *exc):
        return False
