#!/bin/bash
# A two-node SLURM cluster on this one machine (two slurmd daemons, n1 and n2, on other
# ports), for testing scripts/slurm_ray_sweep.sh: tests/deep/test_slurm_recipe.py runs
# when `sinfo` answers. Needs root and Debian's slurm-wlm and munge packages:
#
#   apt-get install -y slurm-wlm munge
#   eval "$(bash scripts/slurm_local_cluster.sh start)"   # exports SLURM_CONF
#   bash scripts/slurm_local_cluster.sh stop
set -euo pipefail
dir=${SURGICAL_SLURM_DIR:-/tmp/surgical-slurm}
conf="$dir/slurm.conf"

up() {  # the cluster answers with both nodes idle
    [ -f "$conf" ] && [ "$(SLURM_CONF="$conf" sinfo -h -t idle -o %D 2>/dev/null || true)" = 2 ]
}

start() {
    if up; then echo "export SLURM_CONF=$conf"; return; fi   # already running
    command -v slurmctld >/dev/null && command -v munged >/dev/null \
        || { echo "slurm-wlm and munge are not installed" >&2; exit 1; }
    mkdir -p "$dir/spool/n1" "$dir/spool/n2" "$dir/state" "$dir/log"
    if ! pgrep -x munged >/dev/null; then
        [ -s /etc/munge/munge.key ] || /usr/sbin/mungekey --create >/dev/null 2>&1 \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        mkdir -p /run/munge && /usr/sbin/munged --force >/dev/null 2>&1
    fi
    cpus=$(nproc)
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
    cat > "$conf" <<CONF
ClusterName=surgical-local
SlurmctldHost=$(hostname)(127.0.0.1)
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmctldPort=${SURGICAL_SLURM_PORT:-16817}
SlurmdSpoolDir=$dir/spool/%n
StateSaveLocation=$dir/state
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldLogFile=$dir/log/slurmctld.log
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
NodeName=n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus RealMemory=$memory
NodeName=n2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus RealMemory=$memory
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$conf"
    slurmctld -f "$conf" -i
    slurmd -f "$conf" -N n1
    slurmd -f "$conf" -N n2
    for _ in $(seq 60); do
        if up; then echo "export SLURM_CONF=$conf"; return; fi
        sleep 1
    done
    echo "the local SLURM cluster did not come up; logs in $dir/log" >&2
    exit 1
}

stop() {
    SLURM_CONF="$conf" scontrol shutdown >/dev/null 2>&1 || true
    pkill -f "slurmd -f $conf" || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
