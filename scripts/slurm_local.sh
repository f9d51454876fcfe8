#!/usr/bin/env bash
# scripts/slurm_local.sh up|down|status        (make cluster-check runs `up`, the smoke matrix on it, then `down`)
#
# A one-node Slurm cluster on this machine, from Debian's packages (slurm-wlm 22.05 + munge), for running
# `vlmforge export-all hydra/launcher=slurm` for real without a cluster. Needs root (it starts daemons).
#
#   up      install slurm-wlm and munge if missing (apt-get), write /etc/slurm/slurm.conf for this host with
#           its real CPU count and memory (only if no slurm.conf exists), start munged, slurmctld and slurmd,
#           and wait until `sinfo` shows the node idle.
#   down    stop the daemons this script started and remove the files it wrote (slurm.conf only when it
#           carries this script's marker line; the state folder $STATE). Never touches anything else.
#   status  sinfo + squeue.
#
# Everything it creates lives in $STATE (default /var/lib/vlmforge-slurm) plus /etc/slurm/slurm.conf.
# The daemons listen on 127.0.0.1 only (NodeAddr and SlurmctldHost address are the loopback).
set -euo pipefail

STATE=${VLMFORGE_SLURM_STATE:-/var/lib/vlmforge-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by vlmforge scripts/slurm_local.sh"
PARTITION=${VLMFORGE_SLURM_PARTITION:-debug}
NODE=$(hostname -s)

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons); fix: sudo $0 $*"; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    echo "installing slurm-wlm and munge (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; fix: use that cluster as it is (vlmforge export-all hydra/launcher=slurm hydra.launcher.partition=...), or move it away yourself"
    fi
    local cpus mem_mb
    cpus=$(nproc)
    # RealMemory must not exceed what slurmd measures (MemTotal), or the node is drained; keep 5% for the OS.
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log" /etc/slurm
    cat >"$CONF" <<EOF
$MARKER (state in $STATE); \`$0 down\` removes it
ClusterName=vlmforge-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MessageTimeout=30
KillWait=5
InactiveLimit=0
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    echo "wrote $CONF: node $NODE, $cpus CPUs, $mem_mb MB, partition $PARTITION"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged already answers (the package's service, or an earlier `up`)
    fi
    [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key && touch "$STATE/munge.key.ours"; }
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge
    mkdir -p /var/log/munge /var/lib/munge && chown munge:munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/munged.ours"
    for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged did not start; see journal or run: runuser -u munge -- /usr/sbin/munged -F"
}

start_slurm() {
    if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        echo "slurmctld already running"
    else
        /usr/sbin/slurmctld -f "$CONF"
    fi
    if [ -f "$STATE/slurmd.pid" ] && kill -0 "$(cat "$STATE/slurmd.pid")" 2>/dev/null; then
        echo "slurmd already running"
    else
        /usr/sbin/slurmd -f "$CONF"
    fi
}

wait_idle() {
    local state=""
    for _ in $(seq 120); do
        state=$(sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null || true)
        case "$state" in
            idle*|mix*|alloc*) echo "node $NODE is $state (partition $PARTITION)"; sinfo; return ;;
            drain*|down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $NODE is '${state:-unknown}' after 60 s; logs: $STATE/log/slurmctld.log $STATE/log/slurmd.log"
}

stop_pidfile() {  # stop_pidfile FILE NAME: SIGTERM the daemon this script started, wait for it to go
    local f=$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        echo "stopped $2 (pid $pid)"
    fi
    rm -f "$f"
}

down() {
    stop_pidfile "$STATE/slurmd.pid" slurmd
    stop_pidfile "$STATE/slurmctld.pid" slurmctld
    if [ -f "$STATE/munged.ours" ]; then
        runuser -u munge -- /usr/sbin/munged --stop >/dev/null 2>&1 && echo "stopped munged"
    fi
    [ -f "$STATE/munge.key.ours" ] && rm -f /etc/munge/munge.key
    if [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF"; then rm -f "$CONF"; fi
    [ -d "$STATE" ] && rm -rf "$STATE"
    echo "one-node cluster is down"
}

case "${1:-}" in
    up) need_root up; install_packages; write_conf; start_munge; start_slurm; wait_idle ;;
    down) need_root down; down ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
