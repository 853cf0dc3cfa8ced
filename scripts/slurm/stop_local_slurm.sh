#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by start_local_slurm.sh:
# slurmd, slurmctld, slurmdbd, mariadbd, munged (in that order).
# Safe to run when nothing is running. Packages, configs and state are kept,
# so start_local_slurm.sh brings the same cluster (and job history) back.
#
#   --keep-deps   stop only the slurm daemons, leave mariadbd and munged up
set -uo pipefail

if [[ $EUID -ne 0 ]]; then
    echo "stop_local_slurm.sh: must run as root" >&2
    exit 1
fi

KEEP_DEPS=0
[[ ${1:-} == --keep-deps ]] && KEEP_DEPS=1

RUNDIR=/run/slurm
MYSQL_RUN=/run/mysqld

log() { echo "[local-slurm] $*"; }

# stop_pidfile NAME PIDFILE: SIGTERM, wait up to 20 s, then SIGKILL
stop_pidfile() {
    local name=$1 pf=$2 pid
    [[ -s $pf ]] || return 0
    pid=$(cat "$pf")
    # only signal the pid if it really is that daemon (pid files can be stale)
    if ! [[ $pid =~ ^[0-9]+$ ]] || [[ $(cat "/proc/$pid/comm" 2>/dev/null) != "$name" ]] \
       || [[ $(ps -o stat= -p "$pid" 2>/dev/null) == Z* ]]; then
        rm -f "$pf"; return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 80); do
        if ! kill -0 "$pid" 2>/dev/null || [[ $(ps -o stat= -p "$pid" 2>/dev/null) == Z* ]]; then
            rm -f "$pf"; return 0
        fi
        sleep 0.25
    done
    log "$name did not exit, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    sleep 0.5
    rm -f "$pf"
}

stop_pidfile slurmd    "$RUNDIR/slurmd.pid"
stop_pidfile slurmctld "$RUNDIR/slurmctld.pid"
stop_pidfile slurmdbd  "$RUNDIR/slurmdbd.pid"

if (( ! KEEP_DEPS )); then
    if [[ -S $MYSQL_RUN/mysqld.sock ]] && command -v mariadb-admin >/dev/null \
       && mariadb-admin --socket="$MYSQL_RUN/mysqld.sock" ping >/dev/null 2>&1; then
        log "stopping mariadbd"
        mariadb-admin --socket="$MYSQL_RUN/mysqld.sock" shutdown >/dev/null 2>&1 || true
        # mariadb-admin shutdown waits for the server; fall back to the pid file
    fi
    stop_pidfile mariadbd "$MYSQL_RUN/mysqld.pid"
    stop_pidfile munged   /run/munge/munged.pid
fi

log "stopped"
exit 0
