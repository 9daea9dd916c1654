#!/usr/bin/env bash
# Report the state of the local Slurm test cluster.  Exit 0 only if it is
# usable (controller up, node usable, accounting answering).
set -uo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -d "$SL_STATE" ]]; then
    sl_init_paths
else
    # Never brought up here: still report on whatever daemons exist.
    SL_STATE_REAL="$SL_STATE" SL_LINK=/nonexistent SL_PIDS=/nonexistent SL_LOGS=/nonexistent
    export SLURM_CONF="${SLURM_CONF:-/etc/slurm/slurm.conf}"
fi
sl_detect_node

usable=1
for name in "${SL_DAEMONS[@]}"; do
    if pid="$(sl_recorded_pid "$name")"; then
        owner="pid $pid, started by up.sh"
    elif pid="$(sl_any_pid "$name")"; then
        owner="pid $pid, not started by up.sh"
    else
        owner=""
    fi
    if "sl_health_$name"; then
        health="up"
    else
        if [[ -n "$owner" ]]; then health="RUNNING BUT UNHEALTHY"; else health="down"; fi
        # MariaDB is only reached through slurmdbd: the slurmdbd/sacct checks
        # decide (a cluster from another state dir may be serving).
        [[ "$name" == mariadbd ]] && health="$health (for this state dir)" || usable=0
    fi
    printf '%-10s %s%s\n' "$name" "$health" "${owner:+ ($owner)}"
done
if sl_health_sacct; then
    printf '%-10s %s\n' sacct "works"
else
    printf '%-10s %s\n' sacct "FAILS"
    usable=0
fi
echo "state dir: $SL_STATE   SLURM_CONF used here: $SLURM_CONF"
timeout 10 sinfo 2>&1 || usable=0

if [[ "$usable" -eq 1 ]]; then
    echo "slurm-local: cluster is usable"
    exit 0
fi
echo "slurm-local: cluster is NOT usable (run slurm/local/up.sh)"
exit 1
