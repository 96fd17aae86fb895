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
# the same command again resumes the sweep from its CSV.
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

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
port=${RAY_PORT:-6379}
address="$head_ip:$port"
export RAY_AUTH_MODE=token                             # one token per job, seen by every step
export RAY_AUTH_TOKEN=$(python -c "import secrets; print(secrets.token_hex(32))")
cpus=${SLURM_CPUS_PER_TASK:-1}
# GPUs: Ray counts those the step sees (CUDA_VISIBLE_DEVICES); SLURM_GPUS_ON_NODE says
# how many were allocated, so a site whose steps hide them still gets the right count.
gpus=()
if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then gpus=(--num-gpus="$SLURM_GPUS_ON_NODE"); fi

# --overlap: the Ray steps share the nodes' CPUs with the batch step, which runs the
# sweep's driver (SLURM 20.11+ gives a step exclusive CPUs otherwise).
srun --overlap --nodes=1 --ntasks=1 -w "$head" \
    ray start --head --node-ip-address="$head_ip" --port="$port" \
    --num-cpus="$cpus" ${gpus[@]+"${gpus[@]}"} --include-dashboard=false --block &

wait_for_nodes() {  # until the cluster has $1 live nodes (at most 5 minutes)
    python - "$address" "$1" <<'PY'
import sys, time
import ray
address, want = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 300
while True:
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        alive = sum(node["Alive"] for node in ray.nodes())
        ray.shutdown()
    except Exception:  # the head is not up yet
        alive = 0
    if alive >= want:
        print(f"ray cluster at {address}: {alive} node(s)", flush=True)
        break
    if time.time() > deadline:
        sys.exit(f"ray cluster at {address}: {alive} of {want} node(s) after 5 minutes")
    time.sleep(5)
PY
}

wait_for_nodes 1
for node in "${nodes[@]:1}"; do
    srun --overlap --nodes=1 --ntasks=1 -w "$node" \
        ray start --address="$address" --num-cpus="$cpus" ${gpus[@]+"${gpus[@]}"} --block &
done
wait_for_nodes "${#nodes[@]}"

python -m deep sweep "$@" --no-progress --backend ray --ray-address "$address"
