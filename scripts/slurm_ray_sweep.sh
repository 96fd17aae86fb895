#!/bin/bash
# A sweep on a SLURM allocation: a Ray head on the first node, one Ray worker on each
# other node, `python -m deep sweep --backend ray` from the batch step (docs/distributed.md).
#
#   sbatch [--nodes=N --cpus-per-task=C --gpus-per-node=G ...] scripts/slurm_ray_sweep.sh \
#       --benchmark cifar10c --data-dir /shared/data/CIFAR-10-C --out /shared/runs/c10c.csv \
#       [--gpus-per-task 0.5 --cpus-per-task 4 ...]
#
# The arguments are the sweep's (any but --backend and --ray-address); sbatch's own flags
# override the #SBATCH lines. Submit from the project folder (or set PROJECT), which
# must be visible to every node, as must --data-dir and --out; its environment is
# $VENV (default .venv in the project; none: the python and ray on PATH). Submitting
# the same command again resumes the sweep from its CSV. The script waits up to RAY_WAIT_S
# seconds (300) for the Ray nodes, and stops with an error if the head does not start.
#SBATCH --job-name=surgical-sweep
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
PROJECT=${PROJECT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$PROJECT"
VENV=${VENV:-.venv}                                  # the same environment on every node
if [ -f "$VENV/bin/activate" ]; then source "$VENV/bin/activate"; fi

# The python of every step must have Ray and this project: said once, not as a wait on
# nodes that never come.
if ! python -c "import ray, deep" 2>/dev/null; then
    echo "error: $(command -v python || echo python) cannot import ray and deep (this project);" \
         "activate the environment that has them (VENV=$VENV, from $PROJECT; pip install -e" \
         "'.[ray]')" >&2
    exit 1
fi

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
port=${RAY_PORT:-6379}
address="$head_ip:$port"
export RAY_AUTH_MODE=token                             # one token per job, seen by every step
token=$(python -c "import secrets; print(secrets.token_hex(32))")  # (set -e: stops on failure)
export RAY_AUTH_TOKEN=$token
cpus=${SLURM_CPUS_PER_TASK:-1}
# GPUs: Ray counts those the step sees (CUDA_VISIBLE_DEVICES); SLURM_GPUS_ON_NODE says
# how many were allocated, so a site whose steps hide them still gets the right count.
gpus=()
if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then gpus=(--num-gpus="$SLURM_GPUS_ON_NODE"); fi

# When the sweep ends, SLURM stops the Ray steps with SIGTERM; Ray (2.60) then drains each
# node for up to 30 s first (meant for Ray Serve), and srun waits that long before its
# SIGKILL: 30 s of the allocation held after the last row, each job. Nothing is left to
# drain by then; a site may still set its own value.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}

# --overlap: the Ray steps share the nodes' CPUs with the batch step, which runs the
# sweep's driver (SLURM 20.11+ gives a step exclusive CPUs otherwise).
srun --overlap --nodes=1 --ntasks=1 -w "$head" \
    ray start --head --node-ip-address="$head_ip" --port="$port" \
    --num-cpus="$cpus" ${gpus[@]+"${gpus[@]}"} --include-dashboard=false --block &
head_step=$!
wait_s=${RAY_WAIT_S:-300}

live_nodes() {  # how many nodes the cluster has now; 0 while the head does not answer
    # The TCP check first: ray.init retries an address where nothing listens forever,
    # and `timeout` bounds any other hang (a port that answers but is not Ray's).
    local count
    count=$(timeout 60 python - "$address" 2>/dev/null <<'PY'
import socket, sys
import ray
host, port = sys.argv[1].rsplit(":", 1)
try:
    socket.create_connection((host, int(port)), timeout=2).close()
except OSError:
    sys.exit("nothing listens there yet")
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(node["Alive"] for node in ray.nodes()), flush=True)
ray.shutdown()
PY
    ) || true
    count=${count##*$'\n'}
    if [[ "$count" =~ ^[0-9]+$ ]]; then echo "$count"; else echo 0; fi
}

wait_for_nodes() {  # until the cluster has $1 live nodes (at most $wait_s seconds)
    local want=$1 deadline=$((SECONDS + wait_s)) alive status
    while true; do
        if ! kill -0 "$head_step" 2>/dev/null; then  # `ray start --head --block` ended
            status=0; wait "$head_step" || status=$?
            echo "error: the Ray head on $head ($address) did not start or has stopped:" \
                 "ray start --head exited with status $status (its output is above)" >&2
            exit 1
        fi
        alive=$(live_nodes)
        if [ "$alive" -ge "$want" ]; then
            echo "ray cluster at $address: $alive node(s)"
            return
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "error: ray cluster at $address: $alive of $want node(s) after" \
                 "$wait_s s (RAY_WAIT_S); the output above of the ray start steps says why" >&2
            exit 1
        fi
        sleep 2
    done
}

wait_for_nodes 1
for node in "${nodes[@]:1}"; do
    srun --overlap --nodes=1 --ntasks=1 -w "$node" \
        ray start --address="$address" --num-cpus="$cpus" ${gpus[@]+"${gpus[@]}"} --block &
done
wait_for_nodes "${#nodes[@]}"

python -m deep sweep "$@" --no-progress --backend ray --ray-address "$address"
