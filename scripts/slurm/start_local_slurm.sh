#!/usr/bin/env bash
# Install (if needed), configure and start a single-node SLURM cluster with
# accounting (slurmdbd + MariaDB) on this machine.  Debian 12, run as root.
#
# Idempotent: running it again keeps running daemons, only (re)starting what
# is down (or restarting the slurm daemons if the generated config changed).
#
# There is no systemd on these machines, so every daemon is started directly.
#
# Tunables (environment):
#   LOCAL_SLURM_CPUS       CPUs declared for the node (default: max(nproc, 8);
#                          more than nproc so that e.g. 4 one-CPU array tasks
#                          run concurrently on a 2-core machine)
#   LOCAL_SLURM_CLUSTER    cluster name (default: localcluster)
#   LOCAL_SLURM_PARTITION  default partition name (default: debug)
#   LOCAL_SLURM_TIMEOUT    seconds to wait for each daemon (default: 60)
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
    echo "start_local_slurm.sh: must run as root" >&2
    exit 1
fi

T0=$(date +%s)
CLUSTER=${LOCAL_SLURM_CLUSTER:-localcluster}
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
NODE=$(hostname -s)
NPROC=$(nproc)
CPUS=${LOCAL_SLURM_CPUS:-$(( NPROC > 8 ? NPROC : 8 ))}
MEM_MB=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
REAL_MEM=$(( MEM_MB > 2048 ? MEM_MB - 1024 : MEM_MB ))   # leave a little for the OS
DEF_MEM_PER_CPU=$(( REAL_MEM / CPUS / 2 ))
(( DEF_MEM_PER_CPU < 100 )) && DEF_MEM_PER_CPU=100

DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=slurm_local_pw

ETC=/etc/slurm
LOGDIR=/var/log/slurm
STATEDIR=/var/lib/slurm
RUNDIR=/run/slurm
MYSQL_RUN=/run/mysqld

log() { echo "[local-slurm] $*"; }

dump_logs() {
    echo "================ daemon logs ================" >&2
    for f in "$MYSQL_RUN/mariadb.log" /var/log/munge/munged.log /var/log/munge/munged.stderr \
             "$LOGDIR/slurmdbd.log" "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" \
             "$LOGDIR/slurmdbd.stderr" "$LOGDIR/slurmctld.stderr" "$LOGDIR/slurmd.stderr" \
             "$MYSQL_RUN/mariadbd.stderr"; do
        if [[ -s $f ]]; then
            echo "---------------- $f (last 40 lines) ----------------" >&2
            tail -n 40 "$f" >&2 || true
        fi
    done
    echo "---------------- processes ----------------" >&2
    ps -eo pid,user,args | grep -E 'munged|mariadbd|mysqld|slurm' | grep -v grep >&2 || true
}

die() {
    echo "start_local_slurm.sh: ERROR: $*" >&2
    dump_logs
    exit 1
}

# wait_for SECONDS DESCRIPTION CMD...
wait_for() {
    local secs=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        if (( $(date +%s) >= deadline )); then
            die "timed out after ${secs}s waiting for: $what"
        fi
        sleep 0.5
    done
}

# pid_alive PIDFILE NAME: true if the pid file names a live process called NAME
# (a stale pid file left by a killed daemon may name a reused pid)
pid_alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(cat "$1")
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    # a killed daemon can linger as a zombie for a while: that is not alive
    [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]]
}

# --------------------------------------------------------------------------
# 1. packages
# --------------------------------------------------------------------------
PKGS=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done
if (( ${#missing[@]} )); then
    log "installing: ${missing[*]}"
    # Keep package maintainer scripts from trying to start services (no systemd
    # here; we start everything ourselves below).
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_ok=1
    apt-get update -q -o DPkg::Lock::Timeout=300 >/dev/null || apt_ok=0
    if (( apt_ok )); then
        apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >/tmp/local-slurm-apt.log 2>&1 || apt_ok=0
    fi
    (( created_policy )) && rm -f /usr/sbin/policy-rc.d
    if (( ! apt_ok )); then
        tail -n 40 /tmp/local-slurm-apt.log >&2 || true
        die "apt-get install failed"
    fi
    log "packages installed in $(( $(date +%s) - T0 ))s"
fi

# --------------------------------------------------------------------------
# 2. munge
# --------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key

if ! pid_alive /run/munge/munged.pid munged; then
    log "starting munged"
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged </dev/null >/var/log/munge/munged.stderr 2>&1 \
        || die "munged failed to start"
fi
wait_for "$TIMEOUT" "munge credential round trip" bash -c 'munge -n | unmunge'

# --------------------------------------------------------------------------
# 3. MariaDB
# --------------------------------------------------------------------------
mkdir -p "$MYSQL_RUN"
chown mysql:mysql "$MYSQL_RUN"
chmod 0755 "$MYSQL_RUN"
cat > /etc/mysql/mariadb.conf.d/99-local-slurm.cnf <<EOF
# written by scripts/slurm/start_local_slurm.sh (values slurmdbd recommends)
[mysqld]
innodb_buffer_pool_size = 1024M
innodb_log_file_size    = 64M
innodb_lock_wait_timeout = 900
max_allowed_packet      = 16M
log_error               = $MYSQL_RUN/mariadb.log
pid_file                = $MYSQL_RUN/mysqld.pid
socket                  = $MYSQL_RUN/mysqld.sock
EOF

if [[ ! -d /var/lib/mysql/mysql ]]; then
    log "initialising MariaDB data dir"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/tmp/local-slurm-mariadb-install.log 2>&1 \
        || { cat /tmp/local-slurm-mariadb-install.log >&2; die "mariadb-install-db failed"; }
fi

if ! mariadb-admin --socket="$MYSQL_RUN/mysqld.sock" ping >/dev/null 2>&1; then
    log "starting mariadbd"
    setsid /usr/sbin/mariadbd --user=mysql \
        --pid-file="$MYSQL_RUN/mysqld.pid" --log-error="$MYSQL_RUN/mariadb.log" \
        --socket="$MYSQL_RUN/mysqld.sock" \
        </dev/null >"$MYSQL_RUN/mariadbd.stderr" 2>&1 &
    wait_for "$TIMEOUT" "mariadbd to answer ping" \
        mariadb-admin --socket="$MYSQL_RUN/mysqld.sock" ping
fi

mariadb --socket="$MYSQL_RUN/mysqld.sock" -u root <<EOF || die "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF

# --------------------------------------------------------------------------
# 4. slurm configuration
# --------------------------------------------------------------------------
mkdir -p "$ETC" "$LOGDIR" "$RUNDIR" "$STATEDIR/slurmctld" "$STATEDIR/slurmd"

new_dbd=$(mktemp); new_conf=$(mktemp)
trap 'rm -f "$new_dbd" "$new_conf"' EXIT

cat > "$new_dbd" <<EOF
# written by scripts/slurm/start_local_slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$LOGDIR/slurmdbd.log
PidFile=$RUNDIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF

cat > "$new_conf" <<EOF
# written by scripts/slurm/start_local_slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATEDIR/slurmctld
SlurmdSpoolDir=$STATEDIR/slurmd
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# the node declares more CPUs than nproc when LOCAL_SLURM_CPUS asks for it
SlurmdParameters=config_overrides
# timers: fast kills and quick turnover for tests
KillWait=5
InactiveLimit=0
MinJobAge=300
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300
# scheduling
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
DefMemPerCPU=$DEF_MEM_PER_CPU
MaxArraySize=10001
# accounting (submitit reads job states through sacct)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
# node and partition
NodeName=$NODE NodeHostname=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

changed=0
if ! cmp -s "$new_dbd" "$ETC/slurmdbd.conf"; then
    install -m 0600 -o root -g root "$new_dbd" "$ETC/slurmdbd.conf"; changed=1
fi
chmod 0600 "$ETC/slurmdbd.conf"; chown root:root "$ETC/slurmdbd.conf"
if ! cmp -s "$new_conf" "$ETC/slurm.conf"; then
    install -m 0644 -o root -g root "$new_conf" "$ETC/slurm.conf"; changed=1
fi

if (( changed )); then
    for d in slurmd slurmctld slurmdbd; do
        if pid_alive "$RUNDIR/$d.pid" "$d"; then
            log "config changed: stopping running $d"
            kill "$(cat "$RUNDIR/$d.pid")" 2>/dev/null || true
            for _ in $(seq 1 40); do pid_alive "$RUNDIR/$d.pid" "$d" || break; sleep 0.25; done
        fi
    done
fi

# --------------------------------------------------------------------------
# 5. slurmdbd, cluster registration, slurmctld, slurmd
# --------------------------------------------------------------------------
if ! pid_alive "$RUNDIR/slurmdbd.pid" slurmdbd; then
    log "starting slurmdbd"
    rm -f "$RUNDIR/slurmdbd.pid"
    setsid /usr/sbin/slurmdbd </dev/null >"$LOGDIR/slurmdbd.stderr" 2>&1 \
        || die "slurmdbd failed to start"
fi
wait_for "$TIMEOUT" "slurmdbd to answer sacctmgr" sacctmgr -n show cluster

if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER" format=cluster 2>/dev/null) ]]; then
    log "registering cluster $CLUSTER in the accounting database"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
fi
# "add cluster" also creates account root with user root; make sure root has
# an association even on a database made by something else.
if [[ -z $(sacctmgr -n -P show assoc cluster="$CLUSTER" user=root format=user 2>/dev/null) ]]; then
    sacctmgr -i add user root account=root cluster="$CLUSTER" >/dev/null 2>&1 || true
fi

if ! pid_alive "$RUNDIR/slurmctld.pid" slurmctld; then
    log "starting slurmctld"
    rm -f "$RUNDIR/slurmctld.pid"
    setsid /usr/sbin/slurmctld </dev/null >"$LOGDIR/slurmctld.stderr" 2>&1 \
        || die "slurmctld failed to start"
fi
wait_for "$TIMEOUT" "slurmctld to answer scontrol ping" \
    bash -c "scontrol ping | grep -q UP"

if ! pid_alive "$RUNDIR/slurmd.pid" slurmd; then
    log "starting slurmd"
    rm -f "$RUNDIR/slurmd.pid"
    setsid /usr/sbin/slurmd -N "$NODE" </dev/null >"$LOGDIR/slurmd.stderr" 2>&1 \
        || die "slurmd failed to start"
fi

node_ready() {
    local st
    st=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1)
    case $st in
        idle|mixed|allocated|completing|idle~|mixed~) return 0 ;;
        down*|drain*|drained*|fail*)
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
            return 1 ;;
        *) return 1 ;;
    esac
}
wait_for "$TIMEOUT" "node $NODE to become idle in partition $PARTITION" node_ready
wait_for "$TIMEOUT" "sacct to answer" sacct -n -X -S now-1minutes

state=$(sinfo -h -N -n "$NODE" -o '%T' | head -n1)
echo "local SLURM ready: cluster=$CLUSTER partition=$PARTITION node=$NODE state=$state cpus=$CPUS (nproc=$NPROC) realmem=${REAL_MEM}MB accounting=slurmdbd+mariadb in $(( $(date +%s) - T0 ))s"
