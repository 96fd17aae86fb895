"""Sweeps on Ray: one Ray task per task group, the driver writes the results CSV.

`execute_groups_on_ray(groups, spec, record, options)` is the Ray counterpart of
the sweep's local dispatch. What it keeps from the local backend, and how:

- A Ray task runs one task group (cells that share the target data and one
  `PrefixCache`), so caching works as on one machine. The task is a Ray
  generator: it yields each cell's row when the cell finishes, and the driver
  writes that row at once (`record`, the sweep's single writer: one atomic
  rewrite of the CSV per row). A kill -9 of the driver therefore loses only the
  cells in flight; the next run resumes from the CSV like a local sweep.
- A worker process that dies mid-task (killed, out of memory, lost node) is a
  system failure: Ray re-runs the task (`max_retries`). A retried generator runs
  its group again from the start; Ray drops the rows the first attempt already
  delivered, and the driver checks that no cell is written twice anyway.
- An exception raised by the task (a data error, a bad option) is not retried
  (`retry_exceptions=False`): the sweep stops with that error, the node's name
  added, and the other tasks are cancelled.
- The pretrained weights are read once, on the driver, and travel through Ray's
  object store, so the checkpoint file need not exist on the workers; only
  `--data-dir` must be visible on every node, which is checked before any task
  starts (the error names the node and the path).
- Ray waits forever, without an error, on an address where nothing listens and on
  a task no node can hold. The driver checks both before it waits: the head's port
  answers as a gRPC server does, and some node has a task group's CPUs and GPUs. Option errors that need
  no cluster are raised before Ray connects (or starts, which takes seconds).

Ray is an optional dependency (`pip install -e ".[ray]"`); this module imports it
only when a Ray sweep starts.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .allocator import keep_freed_memory
from .data import get_benchmark
from .errors import DeepError
from .sweep import group_cells, pretrained_state, row_key, run_group

# Worker deaths Ray absorbs per task group before the sweep gives up.
DEFAULT_MAX_RETRIES = 3
# Ray counts resources in fixed point, in steps of 1/10,000 (RESOURCE_UNIT_SCALING):
# shares are compared in those units, as its scheduler does (1 // 0.1 is 9 in floats).
RESOURCE_UNITS = 10_000
# Tries (a head that is just starting) and seconds each to reach HOST:PORT before the
# address is called wrong: ray.init itself retries a dead address forever.
CONNECT_TRIES = 3
CONNECT_TIMEOUT_S = 2.0
# When the sweep stops: seconds between cancels of a task group that runs on, and
# how long to keep cancelling before the error is raised anyway.
CANCEL_CHECK_S = 1.0
CANCEL_PATIENCE_S = 60.0
# The devices a Ray task runs on: Ray picks each task's GPU, so no index.
RAY_DEVICES = ("auto", "cpu", "cuda")
# Why a cluster that grows on demand (Ray's cluster launcher, KubeRay) may look too
# small: the driver sizes the sweep by the nodes that are up when it starts.
AUTOSCALING_HINT = ("an autoscaling cluster counts only the nodes that are up now: give the "
                    "node type min_workers >= 1, or start the sweep once its nodes have joined "
                    "(`ray status`)")


class RayBackendError(DeepError):
    """The Ray backend cannot run the sweep as asked (options, cluster, data folder)."""


class TaskGroupError(DeepError):
    """A task group raised an error on a Ray worker; the message names the node."""


@dataclass(frozen=True)
class RayOptions:
    """How a sweep uses Ray.

    Attributes:
        address: None: the Ray this process is already connected to, else a new local
            instance; "auto": the cluster running on this machine (`ray start`);
            "HOST:PORT": that cluster's head (its GCS port; not a ray:// client address).
        gpus_per_task: GPUs reserved per task group; below 1 packs several small
            groups on one GPU, above 1 a whole number (Ray's rule). None: 1 when the
            cluster has GPUs and the device is not "cpu", else 0.
        cpus_per_task: CPUs reserved per task group (also its torch threads); any
            share, 1.5 too (Ray allows it for CPUs).
        max_retries: how often Ray re-runs a group whose worker died.
    """

    address: str | None = None
    gpus_per_task: float | None = None
    cpus_per_task: float = 1
    max_retries: int = DEFAULT_MAX_RETRIES

    def __post_init__(self):
        gpus, cpus = self.gpus_per_task, self.cpus_per_task
        if gpus is not None:
            if not gpus >= 0:
                raise RayBackendError(f"--gpus-per-task must be >= 0, got {gpus}")
            _check_quantity("--gpus-per-task", gpus)
            if gpus > 1 and not float(gpus).is_integer():
                raise RayBackendError(f"--gpus-per-task {gpus:g}: Ray reserves a share of one "
                                      "GPU (0.5, 0.25, ...) or whole GPUs (1, 2, ...), "
                                      "not a fraction above 1")
        if not cpus > 0:
            raise RayBackendError(f"--cpus-per-task must be > 0, got {cpus}")
        _check_quantity("--cpus-per-task", cpus)
        if self.max_retries < 0:
            raise RayBackendError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.address is not None:
            _check_address(self.address)


def _check_quantity(flag: str, value: float) -> None:
    # Ray's own errors for these come as tracebacks, once tasks are submitted.
    if not math.isfinite(value):
        raise RayBackendError(f"{flag} must be a finite number, got {value}")
    if 0 < value < 1 / RESOURCE_UNITS:
        raise RayBackendError(f"{flag} {value:g}: Ray counts resources in steps of "
                              f"{1 / RESOURCE_UNITS:g}")


def _check_address(address: str) -> None:
    if "://" in address:  # Ray Client (ray://): another protocol and port, and ray[client]
        raise RayBackendError(
            f"--ray-address {address}: the sweep connects to a cluster's head directly, not "
            "through Ray Client (ray://); give the head's address HOST:PORT (its GCS port, "
            "6379 unless `ray start --head --port` said otherwise), or run the sweep on a "
            "node of the cluster with --ray-address auto")
    if address != "auto" and not _is_host_port(address):
        raise RayBackendError(f"--ray-address must be 'auto' or HOST:PORT, got {address!r}")


def _is_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def import_ray():
    """The ray module, or an error that says how to install it."""
    try:
        import ray
    except ModuleNotFoundError as err:
        if err.name != "ray":
            raise
        raise RayBackendError('--backend ray needs Ray: pip install -e ".[ray]"') from None
    return ray


# --- connecting -------------------------------------------------------------------

class RaySession:
    """Connects to Ray on entry; on exit disconnects only what it connected itself."""

    def __init__(self, address: str | None = None):
        self.address = address
        self.started = False

    def __enter__(self):
        ray = import_ray()
        if ray.is_initialized():
            return ray
        if self.address is not None:
            check_reachable(self.address)
        try:
            if self.address is None:
                # "local": a new instance even where `ray start` left its address in
                # /tmp/ray/ray_current_cluster (plain ray.init() would connect there, and
                # wait on a cluster that is gone)
                ray.init(address="local", include_dashboard=False)
            else:
                ray.init(address=self.address)
        except Exception as err:  # noqa: BLE001 - Ray raises bare Exceptions when a node fails to start
            if self.address is None:
                raise RayBackendError(_local_start_failed(err)) from None
            if not isinstance(err, ConnectionError):
                raise
            raise RayBackendError(
                f"cannot connect to the Ray cluster at {self.address}: {str(err).rstrip('.')}. "
                "Is `ray start` running there? A cluster with token authentication (Ray's "
                "default) also needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or "
                "~/.ray/auth_token) in this shell") from None
        self.started = True
        print(cluster_line(ray, self.address), file=sys.stderr, flush=True)
        return ray

    def __exit__(self, *exc):
        if self.started:
            import_ray().shutdown()


def _local_start_failed(err: Exception) -> str:
    # Another Ray on the machine (or a clean-up of /tmp/ray) is the usual cause: seen on a
    # shared machine as a start-up timeout or a worker log file gone missing.
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"the local Ray instance did not start: {reason.rstrip('.')}. "
            "On a machine shared with other Ray users, give this run a Ray folder of its own "
            "(RAY_TMPDIR=$HOME/ray-tmp) and rerun: the sweep resumes where it stopped "
            "(docs/troubleshooting.md)")


def check_reachable(address: str) -> None:
    """Raise unless the head at `address` ("auto": the one Ray would pick) takes a TCP
    connection and answers as a gRPC server: where nothing listens, or something other
    than Ray's GCS does (the dashboard's port), ray.init logs "Failed to connect to GCS"
    every half minute and never returns."""
    target = _bootstrap_address(address)
    if target is None:  # Ray's internals moved: ray.init reports what it finds
        return
    host, _, port = target.rpartition(":")
    for attempt in range(CONNECT_TRIES):
        if attempt:
            time.sleep(1)
        try:
            with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S) as conn:
                reply = _http2_reply(conn)
            break
        except OSError as err:
            reason = err
    else:
        raise RayBackendError(
            f"no Ray head answers at {_shown(address, target)}: {reason}. Check that the head "
            f"runs (`ray status` on it) and that {port} is its GCS port (`ray start --head` "
            "prints the address to use; 6379 by default), and that no firewall blocks it")
    if not _is_http2_settings(reply):
        # e.g. the dashboard (8265, HTTP/1.1): ray.init would wait on it forever too
        raw = reply.decode("ascii", "replace").splitlines()[0].strip() if reply.strip() else ""
        said = f"it answered {raw!r}" if raw else "it sent nothing back"
        raise RayBackendError(
            f"{_shown(address, target)} takes connections but is not a Ray head's GCS port "
            f"(which speaks gRPC; {said}). Give the address `ray start --head` printed "
            "(port 6379 by default), not the dashboard's (8265) or another service's")


# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers
# with its own SETTINGS frame (9-byte header, type 0x4), whatever its authentication.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _http2_reply(conn: socket.socket) -> bytes:
    """The first bytes a server sends back to the HTTP/2 preface (b"" when it sends none
    within CONNECT_TIMEOUT_S, or closes)."""
    conn.sendall(HTTP2_PREFACE)
    reply = b""
    try:
        while len(reply) < 9:
            chunk = conn.recv(9 - len(reply))
            if not chunk:
                break
            reply += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return reply


def _is_http2_settings(reply: bytes) -> bool:
    return len(reply) == 9 and reply[3] == 0x4


def _shown(address: str, target: str) -> str:
    return target if target == address else (f"{target} (where --ray-address auto points: "
                                             "RAY_ADDRESS, or the last `ray start` here)")


def _bootstrap_address(address: str) -> str | None:
    """HOST:PORT that ray.init(address) dials; "auto" is resolved as Ray does (RAY_ADDRESS,
    then what `ray start` left in /tmp/ray), None where it finds nothing."""
    if address != "auto":
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # Ray's internals moved: no check
        return None
    try:
        return canonicalize_bootstrap_address("auto")
    except ConnectionError:
        raise RayBackendError(
            "--ray-address auto found no running Ray cluster (RAY_ADDRESS is not set, and no "
            "`ray start` ran on this machine): start one with `ray start --head` and give "
            "its HOST:PORT, or drop --ray-address to start a local instance") from None
    except Exception:  # noqa: BLE001 (Ray's internals changed: ray.init reports)
        return None


def cluster_line(ray, address: str | None) -> str:
    """What the sweep runs on, e.g. "ray: cluster at 10.0.0.1:6379: 4 nodes, 128 CPUs, 16 GPUs"."""
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    resources = ray.cluster_resources()
    if address == "auto":  # say where it pointed
        address = _connected_address(ray) or address
    where = f"cluster at {address}" if address else "local instance"
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    return (f"ray: {where}: {nodes} node{'s' * (nodes != 1)}, {cpus:g} CPU{'s' * (cpus != 1)}, "
            f"{gpus:g} GPU{'s' * (gpus != 1)}")


def _connected_address(ray) -> str | None:
    """HOST:PORT of the cluster this driver is connected to (what --ray-address auto
    resolved to); None where Ray does not say."""
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 (Ray's API moved: the address as given)
        return None


def session_for(executor: "RayExecutor | None"):
    """One Ray connection around several sweeps (`bench`): each sweep's executor then
    finds Ray connected and leaves it so. Nothing for the local backend (None)."""
    return contextlib.nullcontext() if executor is None else RaySession(executor.options.address)


# --- resources --------------------------------------------------------------------

def check_device(device: str | None, gpus_per_task: float | None) -> None:
    """The errors of --device (and --gpus-per-task) that need no cluster, raised
    before Ray connects or starts (seconds for a local instance)."""
    if gpus_per_task is not None:
        task_device(device, gpus_per_task)
    elif (device or "auto") not in RAY_DEVICES:
        task_device(device, 0)  # the error that names the device


def task_device(device: str | None, gpus_per_task: float) -> str:
    """The device a task group runs on: Ray gives a task the GPUs it reserved (as
    cuda:0, cuda:1, ... in the task), so the device follows --gpus-per-task."""
    device = device or "auto"
    if device == "auto":
        return "cuda" if gpus_per_task > 0 else "cpu"
    if device == "cpu":
        if gpus_per_task > 0:
            raise RayBackendError(f"--device cpu with --gpus-per-task {gpus_per_task:g} reserves "
                                  "GPUs that no task would use; drop one of the two")
        return "cpu"
    if device == "cuda":
        if gpus_per_task <= 0:
            raise RayBackendError("--device cuda with --backend ray needs --gpus-per-task > 0: "
                                  "Ray shows a task only the GPUs it reserved")
        return "cuda"
    raise RayBackendError(f"--backend ray runs on --device auto, cpu or cuda (Ray picks the "
                          f"GPU of each task), got {device!r}")


def resolve_gpus(options: RayOptions, device: str | None, cluster: dict) -> float:
    """--gpus-per-task, defaulting to one GPU per task where GPUs exist and may be used."""
    if options.gpus_per_task is not None:
        return float(options.gpus_per_task)
    if device == "cuda" and cluster.get("GPU", 0) <= 0:  # not a flag the user left out
        raise RayBackendError("--device cuda, but the Ray cluster has 0 GPUs: run with "
                              f"--device auto or cpu, or add nodes with GPUs ({AUTOSCALING_HINT})")
    return 1.0 if cluster.get("GPU", 0) > 0 and device != "cpu" else 0.0


def concurrent_tasks(cluster: dict, cpus_per_task: float, gpus_per_task: float) -> int:
    """How many task groups the cluster runs at once, which is how many groups the
    sweep needs (it splits tasks when there are fewer)."""
    cpus, gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if _units(cpus) < _units(cpus_per_task):
        raise RayBackendError(f"the Ray cluster has {cpus:g} CPUs; a task group needs "
                              f"--cpus-per-task {cpus_per_task:g} ({AUTOSCALING_HINT})")
    if gpus_per_task > 0 and _units(gpus) < _units(gpus_per_task):
        raise RayBackendError(f"the Ray cluster has {gpus:g} GPUs; a task group needs "
                              f"--gpus-per-task {gpus_per_task:g} (0 runs on CPUs; "
                              f"{AUTOSCALING_HINT})")
    slots = _units(cpus) // _units(cpus_per_task)
    if gpus_per_task > 0:
        slots = min(slots, _units(gpus) // _units(gpus_per_task))
    return max(1, slots)


def _units(quantity: float) -> int:
    return round(quantity * RESOURCE_UNITS)


def check_a_node_fits(nodes: list[dict], cpus_per_task: float, gpus_per_task: float) -> None:
    """Raise unless a live node (of `ray.nodes()`) has a task group's CPUs and GPUs: a
    task runs on one node, and Ray waits forever on one that no node can hold, even
    where the cluster's totals would do."""
    alive = [node for node in nodes if node.get("Alive")]
    if any(_node_fits(node, cpus_per_task, gpus_per_task) for node in alive):
        return
    order = ("GPU", "CPU") if gpus_per_task > 0 else ("CPU", "GPU")
    largest = max(alive, key=lambda n: tuple(n["Resources"].get(r, 0) for r in order),
                  default={"Resources": {}, "NodeManagerAddress": "no node alive"})
    have = largest["Resources"]
    request = f"--cpus-per-task {cpus_per_task:g}"
    if gpus_per_task > 0:
        request += f" and --gpus-per-task {gpus_per_task:g}"
    raise RayBackendError(
        f"no node of the Ray cluster can hold a task group ({request}; a task runs on one "
        f"node): the largest ({largest['NodeManagerAddress']}) has {have.get('CPU', 0):g} "
        f"CPUs and {have.get('GPU', 0):g} GPUs. Ask for less per task group, or add bigger "
        f"nodes ({AUTOSCALING_HINT})")


def _node_fits(node: dict, cpus_per_task: float, gpus_per_task: float) -> bool:
    resources = node["Resources"]
    return (_units(resources.get("CPU", 0)) >= _units(cpus_per_task)
            and _units(resources.get("GPU", 0)) >= _units(gpus_per_task))


# --- the data folder on every node ------------------------------------------------

def _node_name() -> str:
    return socket.gethostname()


def _probe_data_dir(path: str, benchmark: str | None = None,
                    shifts: tuple[str, ...] = ()) -> tuple[str, bool, str | None]:
    """On one node: its name, whether `path` is a folder there, and what the benchmark's
    check of the shifts' files says there (None: all present, or it cannot tell)."""
    visible, problem = os.path.isdir(path), None
    check = get_benchmark(benchmark).check_shift_files if benchmark else None
    if visible and check is not None and shifts:
        try:
            check(path, list(shifts))
        except DeepError as err:
            problem = str(err)
    return _node_name(), visible, problem


def check_data_dir(ray, data_dir: str, cpus_per_task: float, gpus_per_task: float,
                   what: str = "--data-dir", benchmark: str | None = None,
                   shifts: tuple[str, ...] = ()) -> None:
    """Raise naming every node that may run a task group but cannot see `data_dir`
    (`what`: how to name it, the flag or the default folder the driver resolved), or,
    where `benchmark` can tell, lacks the files of one of `shifts` there: the check a
    local sweep makes before it starts (`Benchmark.check_local_data`), made on the nodes,
    so that a partial copy fails now and not when its task group loads the shift."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe_data_dir)
    nodes = [n for n in ray.nodes()
             if n.get("Alive") and _node_fits(n, cpus_per_task, gpus_per_task)]
    refs = {}
    for node in nodes:  # one probe pinned to each node (by id: nodes may share an address)
        on_node = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        refs[node["NodeID"]] = (node["NodeManagerAddress"], probe.options(
            scheduling_strategy=on_node).remote(data_dir, benchmark, tuple(shifts)))
    missing, incomplete = [], {}
    shared = len({address for address, _ in refs.values()}) < len(refs)
    for node_id, (address, ref) in refs.items():
        host, visible, problem = ray.get(ref)
        # several nodes at one address (one host): their ids tell them apart
        where = f"{host} ({address}, node {node_id[:8]})" if shared else f"{host} ({address})"
        if not visible:
            missing.append(where)
        elif problem is not None:
            incomplete.setdefault(problem, []).append(where)
    if missing:
        raise RayBackendError(f"{what} {data_dir} is not a folder on node(s) "
                              f"{', '.join(missing)}; every node that runs task groups must see "
                              "the data at the same path (a shared file system, or a copy)")
    if incomplete:
        raise RayBackendError("; ".join(f"on node(s) {', '.join(nodes)}: {problem}"
                                        for problem, nodes in incomplete.items()))


# --- the task ---------------------------------------------------------------------

def run_group_task(cells, spec: dict, pretrained: dict, threads: int):
    """A Ray generator task: run one task group, yield each cell's row as it finishes."""
    torch.set_num_threads(threads)
    keep_freed_memory()
    if spec.get("device") == "cuda" and not torch.cuda.is_available():
        # Ray gave this task a GPU the node advertises, but its torch cannot use one
        raise TaskGroupError(f"task group {_describe(cells)} was given a GPU on node "
                             f"{_node_name()}, but torch there sees none (torch "
                             f"{torch.__version__}): run with --gpus-per-task 0 (or --device "
                             "cpu), or give that node a CUDA build of torch, or start it "
                             "without --num-gpus")
    try:
        yield from run_group(cells, **spec, pretrained=pretrained)
    except (ValueError, OSError) as err:  # bad data or options: no use retrying
        raise TaskGroupError(f"task group {_describe(cells)} failed on node {_node_name()}: "
                             f"{err}") from err
    except torch.cuda.OutOfMemoryError as err:  # likeliest with --gpus-per-task below 1
        raise TaskGroupError(f"task group {_describe(cells)} ran out of GPU memory on node "
                             f"{_node_name()}: give each task group a larger GPU share "
                             f"(--gpus-per-task) or a smaller prefix cache (--cache-mb); "
                             f"{err}") from err


def _describe(group) -> str:
    first = group[0]
    return f"{first.benchmark}/{first.shift} seed {first.seed} ({len(group)} cells)"


def execute_groups_on_ray(ray, groups: list, spec: dict, record: Callable[[dict], None],
                          pretrained: dict, options: RayOptions, gpus_per_task: float) -> None:
    """Run every task group as one Ray task; `record` each row once, as it arrives.

    Args:
        ray: the connected ray module (see `RaySession`).
        groups: lists of cells (`deep.sweep.Cell`), one Ray task each.
        spec: `run_group`'s keyword arguments (device already resolved for a task).
        record: the driver's writer of one row (the single writer of the CSV).
        pretrained: the pretrained state dict, put in the object store once.
    """
    # A GPU task gets a fresh worker process (max_calls=1, as Ray's own default for
    # GPU functions): CUDA, once initialised, ignores the GPU Ray assigns the next task.
    reuse = {"max_calls": 1} if gpus_per_task > 0 else {}
    task = ray.remote(num_cpus=options.cpus_per_task, num_gpus=gpus_per_task,
                      max_retries=options.max_retries, retry_exceptions=False,
                      **reuse)(run_group_task)
    weights = ray.put(pretrained)
    threads = max(1, int(options.cpus_per_task))
    running = {task.remote(group, spec, weights, threads): group for group in groups}
    written: set[tuple] = set()
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            for generator in ready:
                _take_next(ray, generator, running, written, record)
    except BaseException:
        stop_groups(ray, list(running))  # instead of letting them run on
        raise


def stop_groups(ray, generators: list, patience_s: float = CANCEL_PATIENCE_S) -> None:
    """Cancel the task groups and return once each has ended (or after `patience_s`).

    Ray can lose a cancel that reaches a task while it is being handed to a worker
    (ray-project/ray#24359, #52703), and the group then runs to its end. So the
    driver cancels again until every task reports an end: cancelled, failed or done.
    """
    deadline = time.monotonic() + patience_s
    while generators and time.monotonic() < deadline:
        for generator in generators:
            ray.cancel(generator, force=True)
        ready, generators = ray.wait(generators, num_returns=len(generators),
                                     timeout=CANCEL_CHECK_S)
        for generator in ready:
            try:
                ray.get(next(generator))  # its row is dropped: the cell reruns on resume
            except Exception:  # noqa: BLE001 (StopIteration, cancelled, killed: it ended)
                continue
            generators.append(generator)  # it delivered a row: the cancel was lost
    if generators:
        print(f"warning: {len(generators)} task group(s) still ran {patience_s:g} s after the "
              "sweep stopped; `ray list tasks` on the cluster shows them", file=sys.stderr)


def _lost_worker_errors() -> tuple:
    from ray import exceptions
    return (exceptions.WorkerCrashedError, exceptions.OutOfMemoryError,
            exceptions.NodeDiedError, exceptions.LocalRayletDiedError)


def _take_next(ray, generator, running: dict, written: set, record) -> None:
    group = running[generator]
    try:
        row = ray.get(next(generator))
    except StopIteration:
        del running[generator]
        return
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, TaskGroupError):
            del running[generator]
            raise TaskGroupError(str(err.cause)) from None
        raise  # a bug: Ray's error keeps the remote traceback
    except _lost_worker_errors() as err:
        del running[generator]
        raise TaskGroupError(f"task group {_describe(group)}: its worker died and Ray's retries "
                             f"are used up ({type(err).__name__}; killed, out of memory or a "
                             "lost node: Ray's logs on that node say which)") from err
    key = row_key(row)
    if key not in {c.key for c in group}:
        raise RuntimeError(f"task group {_describe(group)} returned a row of another cell: {key}")
    if key not in written:  # a retried group re-runs cells Ray already delivered
        written.add(key)
        record(row)


class RayExecutor:
    """`run_sweep`'s executor for --backend ray: executor(cells, spec, record).

    Connects (or starts a local Ray) per sweep unless Ray is already connected
    (`session_for` keeps one connection across the sweeps of a bench suite)."""

    def __init__(self, options: RayOptions):
        self.options = options

    def check_options(self, device: str | None) -> None:
        """The errors of --device and --gpus-per-task that need no cluster (Ray starts or
        connects in seconds; a bench suite checks before it does)."""
        check_device(device, self.options.gpus_per_task)
        gpus = self.options.gpus_per_task or 0
        if self.options.address is not None or torch.cuda.is_available() \
                or import_ray().is_initialized():
            return
        # a new local instance has this machine's GPUs: it would start, then find none
        if gpus > 0:
            raise RayBackendError(
                f"--gpus-per-task {gpus:g} on a local Ray instance, but torch sees no CUDA GPU "
                "on this machine: drop --gpus-per-task (tasks run on the CPUs), or give "
                "--ray-address of a cluster with GPUs")
        if device is not None and device.startswith("cuda"):
            raise RayBackendError(
                f"--device {device} on a local Ray instance, but torch sees no CUDA GPU on this "
                "machine: use --device cpu or auto, or give --ray-address of a cluster with GPUs")

    def session(self, device: str | None) -> "RaySession":
        """The connection `run_sweep` holds around the sweep, made after the option checks
        (`__call__` then finds Ray connected and leaves it so)."""
        self.check_options(device)
        return RaySession(self.options.address)

    def __call__(self, cells: list, spec: dict, record: Callable[[dict], None]) -> None:
        options = self.options
        self.check_options(spec.get("device"))
        with RaySession(options.address) as ray:
            cluster = ray.cluster_resources()
            gpus = resolve_gpus(options, spec.get("device"), cluster)
            spec = dict(spec, device=task_device(spec.get("device"), gpus))
            slots = concurrent_tasks(cluster, options.cpus_per_task, gpus)
            check_a_node_fits(ray.nodes(), options.cpus_per_task, gpus)
            benchmark = spec["protocol"].benchmark
            data_dir = spec.get("data_dir") or driver_data_dir(benchmark)
            what = "--data-dir" if spec.get("data_dir") else f"{benchmark}'s default data folder"
            if data_dir:
                spec["data_dir"] = os.path.abspath(data_dir)  # workers start elsewhere
                check_data_dir(ray, spec["data_dir"], options.cpus_per_task, gpus, what,
                               benchmark, tuple(sorted({cell.shift for cell in cells})))
            # As with local workers: with fewer tasks than slots, tasks are split.
            execute_groups_on_ray(ray, group_cells(cells, slots), spec, record,
                                  pretrained_weights(spec), options, gpus)


def driver_data_dir(benchmark: str) -> str | None:
    """Where the benchmark's loaders read without --data-dir, as the driver sees it (an
    environment variable set in the driver's shell is not set on the nodes)."""
    default = get_benchmark(benchmark).default_data_dir
    return str(default()) if default is not None else None


def pretrained_weights(spec: dict) -> dict:
    """The source model's state dict, read here once (the driver's copy is what the
    object store hands to every task, so workers need no checkpoint file)."""
    protocol = spec["protocol"]
    bench = get_benchmark(protocol.benchmark)
    return pretrained_state(spec["checkpoint"], protocol.arch, bench.num_classes,
                            bench.in_channels, spec.get("trust_checkpoint", False))


# --- command line -----------------------------------------------------------------

def add_backend_arguments(parser) -> None:
    """--backend and the Ray options, shared by `sweep` and `bench`."""
    group = parser.add_argument_group("distributed sweeps (Ray; see docs/distributed.md)")
    group.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="local: processes on this machine (--workers); ray: one Ray task "
                            "per task group, on a local Ray or a cluster")
    group.add_argument("--ray-address", help="'auto' (the cluster `ray start` runs on this "
                       "machine) or HOST:PORT of a head (its GCS port, 6379 by default; not "
                       "ray://); default: start a local Ray")
    group.add_argument("--gpus-per-task", type=float,
                       help="GPUs per task group, below 1 to share a GPU (default: 1 where "
                            "the cluster has GPUs and --device is not cpu, else 0)")
    group.add_argument("--cpus-per-task", type=float, default=1,
                       help="CPUs (and torch threads) per task group (default 1)")


def executor_from_args(args) -> RayExecutor | None:
    """`run_sweep`'s executor for the parsed flags (None: the local backend)."""
    options = options_from_args(args)
    return None if options is None else RayExecutor(options)


def options_from_args(args) -> RayOptions | None:
    """RayOptions for --backend ray, None for the local backend (where Ray flags are an error)."""
    if args.backend != "ray":
        given = [flag for flag, value in (("--ray-address", args.ray_address),
                                          ("--gpus-per-task", args.gpus_per_task))
                 if value is not None]
        if args.cpus_per_task != 1:
            given.append("--cpus-per-task")
        if given:
            raise RayBackendError(f"{', '.join(given)} given without --backend ray "
                                  "(they configure the Ray backend)")
        return None
    if getattr(args, "workers", None) is not None:
        raise RayBackendError("--workers starts processes on this machine; with --backend ray, "
                              "Ray places the task groups on its nodes: drop --workers (a task "
                              "group's share is --cpus-per-task / --gpus-per-task)")
    return RayOptions(address=args.ray_address, gpus_per_task=args.gpus_per_task,
                      cpus_per_task=args.cpus_per_task)
