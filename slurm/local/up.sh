#!/usr/bin/env bash
# shellcheck disable=SC2034  # pidfile_*/log_* are read indirectly by ensure()
# Bring up the local single-node Slurm test cluster (idempotent).
# See slurm/local/README.md.  Needs root.
set -Eeuo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
trap 'sl_die "up.sh failed at line $LINENO: $BASH_COMMAND"' ERR

T_START="$(sl_now)"
[[ "$(id -u)" -eq 0 ]] || sl_die "up.sh must run as root (it installs packages and starts daemons)"

# The daemons (users slurm, mysql) must traverse the state dir and what
# mkdir creates in it, whatever root's umask is (db.pass sets its own).
umask 022
mkdir -p "$SL_STATE"
chmod 755 "$SL_STATE"
sl_init_paths
mkdir -p "$SL_STATE/etc" "$SL_PIDS" "$SL_LOGS"
[[ -f "$SL_STATE/.gitignore" ]] || printf '*\n' >"$SL_STATE/.gitignore"

# Serialise concurrent up.sh/down.sh calls.  fd 9 is closed for every daemon
# we start (9>&-) so they never inherit the lock.
exec 9>"$SL_STATE/.lock"
flock -w 300 9 || sl_die "timed out waiting for $SL_STATE/.lock (another up.sh/down.sh running?)"

# ---------------------------------------------------------------- packages ----
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
packages_ok() {
    local c
    for c in munged munge unmunge mungekey mariadbd mariadb mariadb-admin mariadb-install-db \
        slurmdbd slurmctld slurmd sbatch sacct sacctmgr sinfo squeue scontrol scancel; do
        command -v "$c" >/dev/null 2>&1 || return 1
    done
    compgen -G '/usr/lib/*/slurm-wlm/accounting_storage_mysql.so' >/dev/null || return 1
    getent passwd slurm munge mysql >/dev/null || return 1
}
if ! packages_ok; then
    t="$(sl_now)"
    apt_log="$SL_LOGS/apt.log"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from starting daemons (mariadb, slurm*) themselves.
    policy_added=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    apt_ok=0
    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
        apt-get update -qq >>"$apt_log" 2>&1 || true
    fi
    if apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >>"$apt_log" 2>&1; then
        apt_ok=1
    elif apt-get update -qq >>"$apt_log" 2>&1 &&
        apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >>"$apt_log" 2>&1; then
        apt_ok=1
    fi
    [[ "$policy_added" -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
    [[ "$apt_ok" -eq 1 ]] || sl_die "apt-get install ${PKGS[*]} failed (see $apt_log)"
    packages_ok || sl_die "packages installed but some binaries are missing (see $apt_log)"
    sl_msg "packages: installed ($(sl_since "$t"))"
fi

# --------------------------------------------------------------- state dir ----
mkdir -p "$SL_STATE/run" "$SL_STATE/spool/slurmctld" "$SL_STATE/spool/slurmd" "$SL_STATE/mysql"
chown slurm:slurm "$SL_LOGS" "$SL_STATE/run" "$SL_STATE/spool/slurmctld"
chmod 755 "$SL_LOGS" "$SL_STATE/run" "$SL_STATE/etc"
chmod 700 "$SL_STATE/spool/slurmctld"
chmod 755 "$SL_PIDS"
chown mysql:mysql "$SL_STATE/mysql"
chmod 750 "$SL_STATE/mysql"
if [[ "$(readlink "$SL_LINK" 2>/dev/null || true)" != "$SL_STATE_REAL" ]]; then
    rm -f "$SL_LINK"
    ln -s "$SL_STATE_REAL" "$SL_LINK"
fi
L="$SL_LINK"
setpriv --reuid=slurm --regid=slurm --init-groups test -w "$L/log/" -a -w "$L/spool/slurmctld/" ||
    sl_die "user 'slurm' cannot write into $SL_STATE (a parent dir is not world-traversable?); set SLURM_LOCAL_DIR elsewhere"
setpriv --reuid=mysql --regid=mysql --init-groups test -w "$L/mysql/" ||
    sl_die "user 'mysql' cannot write into $SL_STATE/mysql (a parent dir is not world-traversable?); set SLURM_LOCAL_DIR elsewhere"

# ----------------------------------------------------------------- configs ----
# install_if_changed TMPFILE DEST OWNER MODE -> prints "changed" if an existing
# DEST was changed ("new" if it did not exist, nothing if unchanged).
install_if_changed() {
    local tmp="$1" dst="$2" owner="$3" mode="$4"
    if [[ -f "$dst" ]] && cmp -s "$tmp" "$dst"; then
        rm -f "$tmp"
        chown "$owner" "$dst"
        chmod "$mode" "$dst"
        return 0
    fi
    chown "$owner" "$tmp"
    chmod "$mode" "$tmp"
    if [[ -f "$dst" ]]; then echo changed; else echo new; fi
    mv -f "$tmp" "$dst"
}

[[ "$SL_CPUS" =~ ^([0-9]+|auto)$ ]] || sl_die "SLURM_LOCAL_CPUS must be a number or 'auto' (got '$SL_CPUS')"
[[ -z "$SL_MEM_MB" || "$SL_MEM_MB" =~ ^[0-9]+$ ]] || sl_die "SLURM_LOCAL_MEM_MB must be a number (got '$SL_MEM_MB')"
[[ "$SL_DB_PORT" =~ ^[0-9]+$ ]] || sl_die "SLURM_LOCAL_DB_PORT must be a number (got '$SL_DB_PORT')"

hw="$(slurmd -C 2>/dev/null | head -n1)" || true
[[ "$hw" == NodeName=* ]] || sl_die "'slurmd -C' gave no node line"
hwget() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" <<<"$hw"; }
SL_NODE="$(hwget NodeName)"
hw_mem="$(hwget RealMemory)"
if [[ -n "$SL_MEM_MB" ]]; then
    mem="$SL_MEM_MB"
elif ((hw_mem > 4096)); then
    mem=$((hw_mem - 1024))
else
    mem=$((hw_mem * 3 / 4))
fi
if [[ "$SL_CPUS" == auto ]]; then
    node_hw="CPUs=$(hwget CPUs) Boards=$(hwget Boards) SocketsPerBoard=$(hwget SocketsPerBoard) CoresPerSocket=$(hwget CoresPerSocket) ThreadsPerCore=$(hwget ThreadsPerCore)"
else
    node_hw="CPUs=$SL_CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$SL_CPUS ThreadsPerCore=1"
fi

if [[ ! -s "$SL_STATE/etc/db.pass" ]]; then
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$SL_STATE/etc/db.pass")
fi
db_pass="$(cat "$SL_STATE/etc/db.pass")"

tmp="$(mktemp "$SL_STATE/etc/.slurm.conf.XXXXXX")"
cat >"$tmp" <<EOF
$SL_MARKER -- do not edit; state dir: $SL_STATE_REAL
# $L is a symlink to the state dir (short, space-free paths for the daemons).
ClusterName=$SL_CLUSTER
SlurmctldHost=$SL_NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$L/spool/slurmctld
SlurmdSpoolDir=$L/spool/slurmd
SlurmctldPidFile=$L/run/slurmctld.pid
SlurmdPidFile=$L/run/slurmd.pid
SlurmctldLogFile=$L/log/slurmctld.log
SlurmdLogFile=$L/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
MailProg=/bin/true
EnforcePartLimits=ALL
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=$SL_NODE NodeAddr=127.0.0.1 $node_hw RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$SL_NODE Default=YES MaxTime=INFINITE State=UP
EOF
slurm_conf_changed="$(install_if_changed "$tmp" "$SL_STATE/etc/slurm.conf" root:root 644)"

tmp="$(mktemp "$SL_STATE/etc/.slurmdbd.conf.XXXXXX")"
cat >"$tmp" <<EOF
$SL_MARKER -- do not edit
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=$L/run/slurmdbd.pid
LogFile=$L/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$SL_DB_PORT
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF
dbd_conf_changed="$(install_if_changed "$tmp" "$SL_STATE/etc/slurmdbd.conf" slurm:slurm 600)"

tmp="$(mktemp "$SL_STATE/etc/.my.cnf.XXXXXX")"
cat >"$tmp" <<EOF
$SL_MARKER -- do not edit
[mysqld]
user=mysql
datadir=$L/mysql/data
socket=$L/mysql/mysqld.sock
pid-file=$L/mysql/mysqld.pid
log-error=$L/mysql/mysqld.err
port=$SL_DB_PORT
bind-address=127.0.0.1
skip-name-resolve
innodb_log_file_size=16M
innodb_buffer_pool_size=256M
innodb_lock_wait_timeout=900
max_allowed_packet=64M
EOF
mycnf_changed="$(install_if_changed "$tmp" "$SL_STATE/etc/my.cnf" root:root 644)"

# Client copy so that plain `sbatch`/`sacct`/... work with no environment.
if [[ "$SL_ETC_CONF" != none ]]; then
    mkdir -p "$(dirname "$SL_ETC_CONF")"
    if [[ -e "$SL_ETC_CONF" ]] && ! head -n1 "$SL_ETC_CONF" | grep -qF "$SL_MARKER"; then
        bak="$SL_ETC_CONF.bak.$(date +%Y%m%d%H%M%S)"
        mv -f "$SL_ETC_CONF" "$bak"
        sl_msg "moved foreign $SL_ETC_CONF to $bak"
    fi
    if ! cmp -s "$SL_STATE/etc/slurm.conf" "$SL_ETC_CONF"; then
        cp -f "$SL_STATE/etc/slurm.conf" "$SL_ETC_CONF.tmp.$$"
        chmod 644 "$SL_ETC_CONF.tmp.$$"
        mv -f "$SL_ETC_CONF.tmp.$$" "$SL_ETC_CONF"
    fi
fi

# Config changed under a running daemon of ours -> restart it.
restart_if_ours() {
    local name
    for name in "$@"; do
        if sl_recorded_pid "$name" >/dev/null; then
            sl_msg "$name: config changed, restarting"
            sl_stop "$name" || true
        elif sl_any_pid "$name" >/dev/null; then
            sl_msg "WARNING: $name config changed but that $name was not started by up.sh; not restarting it"
        fi
    done
}
[[ "$slurm_conf_changed" == changed ]] && restart_if_ours slurmd slurmctld
[[ "$dbd_conf_changed" == changed ]] && restart_if_ours slurmdbd
[[ "$mycnf_changed" == changed ]] && restart_if_ours mariadbd

# ----------------------------------------------------------------- daemons ----
# wait_for CHECK TIMEOUT_S: poll CHECK every 0.1 s.
wait_for() {
    local check="$1" tmo="$2" i
    for ((i = 0; i < tmo * 10; i++)); do
        "$check" && return 0
        sleep 0.1
    done
    "$check"
}

# wait_started NAME CHECK TIMEOUT_S: like wait_for, but gives up early (status 2)
# once no process called NAME is left (the daemon died during startup).
wait_started() {
    local name="$1" check="$2" tmo="$3" i
    for ((i = 0; i < tmo * 10; i++)); do
        "$check" && return 0
        if ((i >= 20 && i % 10 == 0)) && ! sl_any_pid "$name" >/dev/null; then
            "$check" && return 0
            return 2
        fi
        sleep 0.1
    done
    "$check"
}

fail_with_log() { # NAME LOGFILE MESSAGE
    if [[ -f "$2" ]]; then
        printf -- '--- last lines of %s ---\n' "$2" >&2
        tail -n 15 "$2" >&2 || true
    fi
    sl_die "$3"
}

start_munged() {
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -d /var/lib/munge ]] || install -d -o munge -g munge -m 0711 /var/lib/munge
    [[ -d /var/log/munge ]] || install -d -o munge -g munge -m 0700 /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    rm -f /run/munge/munged.pid
    setpriv --reuid=munge --regid=munge --init-groups -- munged --force \
        </dev/null >>"$SL_LOGS/munged.out" 2>&1 9>&-
}
pidfile_munged=/run/munge/munged.pid
log_munged=/var/log/munge/munged.log

start_mariadbd() {
    if [[ ! -d "$SL_STATE/mysql/data/mysql" ]]; then
        rm -rf "$SL_STATE/mysql/data"
        mariadb-install-db --defaults-file="$L/etc/my.cnf" --auth-root-authentication-method=socket \
            --skip-test-db >>"$SL_LOGS/mariadb-install.log" 2>&1 9>&- ||
            fail_with_log mariadbd "$SL_LOGS/mariadb-install.log" "mariadb-install-db failed (see $SL_LOGS/mariadb-install.log)"
    fi
    rm -f "$SL_STATE/mysql/mysqld.pid"
    setsid mariadbd --defaults-file="$L/etc/my.cnf" </dev/null >>"$SL_LOGS/mariadbd.out" 2>&1 9>&- &
}
pidfile_mariadbd="$SL_STATE/mysql/mysqld.pid"
log_mariadbd="$SL_STATE/mysql/mysqld.err"

start_slurmdbd() {
    rm -f "$SL_STATE/run/slurmdbd.pid"
    SLURM_CONF="$L/etc/slurm.conf" slurmdbd </dev/null >>"$SL_LOGS/slurmdbd.out" 2>&1 9>&-
}
pidfile_slurmdbd="$SL_STATE/run/slurmdbd.pid"
log_slurmdbd="$SL_LOGS/slurmdbd.log"

start_slurmctld() {
    rm -f "$SL_STATE/run/slurmctld.pid"
    SLURM_CONF="$L/etc/slurm.conf" slurmctld </dev/null >>"$SL_LOGS/slurmctld.out" 2>&1 9>&-
}
pidfile_slurmctld="$SL_STATE/run/slurmctld.pid"
log_slurmctld="$SL_LOGS/slurmctld.log"

start_slurmd() {
    rm -f "$SL_STATE/run/slurmd.pid"
    SLURM_CONF="$L/etc/slurm.conf" slurmd -N "$SL_NODE" </dev/null >>"$SL_LOGS/slurmd.out" 2>&1 9>&-
}
pidfile_slurmd="$SL_STATE/run/slurmd.pid"
log_slurmd="$SL_LOGS/slurmd.log"

# A node left DOWN/DRAINED (e.g. by an earlier crash) is resumed once.
node_resumed=0
health_slurmd_fix() {
    sl_health_slurmd && return 0
    if [[ "$node_resumed" -eq 0 ]] && sl_any_pid slurmd >/dev/null; then
        case "$(sl_node_state)" in
            down* | drain* | fail*)
                node_resumed=1
                scontrol update NodeName="$SL_NODE" State=RESUME >/dev/null 2>&1 || true
                ;;
        esac
    fi
    return 1
}

# ensure NAME TIMEOUT_S: start NAME unless it is already healthy; record its PID.
ensure() {
    local name="$1" tmo="$2" t pid check pf log
    t="$(sl_now)"
    check="sl_health_$name"
    [[ "$name" == slurmd ]] && check=health_slurmd_fix
    if "$check"; then
        pid="$(sl_recorded_pid "$name" || true)"
        sl_msg "$name: already up${pid:+ (pid $pid)} ($(sl_since "$t"))"
        return 0
    fi
    if pid="$(sl_recorded_pid "$name")"; then
        # Ours but not (yet) healthy: give it a moment, else restart it.
        if wait_for "$check" 5; then
            sl_msg "$name: up (pid $pid) ($(sl_since "$t"))"
            return 0
        fi
        sl_msg "$name: pid $pid unhealthy, restarting"
        sl_stop "$name" 15 || true
    fi
    "start_$name"
    pf="pidfile_$name"
    log="log_$name"
    local rc=0
    wait_started "$name" "$check" "$tmo" || rc=$?
    if [[ "$rc" -eq 2 ]]; then
        fail_with_log "$name" "${!log}" "$name exited during startup (log: ${!log})"
    elif [[ "$rc" -ne 0 ]]; then
        fail_with_log "$name" "${!log}" "$name did not become healthy within ${tmo}s (log: ${!log})"
    fi
    pid=""
    if [[ -f "${!pf}" ]]; then
        pid="$(tr -dc '0-9' <"${!pf}")"
    fi
    if [[ -n "$pid" ]] && sl_pid_is "$pid" "$name"; then
        printf '%s\n' "$pid" >"$SL_PIDS/$name.pid"
    else
        sl_die "$name is healthy but its pid file ${!pf} does not name a live $name"
    fi
    sl_msg "$name: started (pid $pid) ($(sl_since "$t"))"
}

ensure munged 15
dbd_was_up=0
sl_health_slurmdbd && dbd_was_up=1
if [[ "$dbd_was_up" -eq 1 ]] && ! sl_health_mariadbd; then
    # slurmdbd answers on 127.0.0.1:6819 although this state dir's MariaDB is
    # not running: a cluster from another state dir is serving.  Reuse it.
    sl_msg "mariadbd: not running for this state dir, but a slurmdbd answers (cluster from another SLURM_LOCAL_DIR?); reusing it"
else
    ensure mariadbd 60
fi

if [[ "$dbd_was_up" -eq 0 ]]; then
    mariadb --no-defaults --socket="$L/mysql/mysqld.sock" -u root <<EOF || sl_die "could not create the slurm_acct_db database/user in MariaDB"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
fi

ensure slurmdbd 60

if ! timeout 10 sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qxF "$SL_CLUSTER"; then
    timeout 30 sacctmgr -i add cluster "$SL_CLUSTER" >/dev/null 2>&1 ||
        sl_die "sacctmgr add cluster $SL_CLUSTER failed"
    sl_msg "accounting: registered cluster '$SL_CLUSTER'"
fi

ensure slurmctld 60
ensure slurmd 60

t="$(sl_now)"
wait_for sl_health_sacct 30 || sl_die "sacct does not work (slurmdbd at 127.0.0.1:6819; log: $SL_LOGS/slurmdbd.log)"

sl_msg "cluster '$SL_CLUSTER' up: node $SL_NODE $(sl_node_state), partition debug; total $(sl_since "$T_START")"
