#!/usr/bin/env bash
# Stop the daemons that slurm/local/up.sh started (and only those), in reverse
# start order.  Idempotent.  See slurm/local/README.md.
set -Eeuo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
trap 'sl_die "down.sh failed at line $LINENO: $BASH_COMMAND"' ERR

T_START="$(sl_now)"
# A cluster started before the state dir moved out of the checkout keeps its
# PID records in <repo>/.slurm-local; point at it instead of ignoring it.
if [[ -z "${SLURM_LOCAL_DIR:-}" ]] && compgen -G "$SL_STATE_LEGACY/pids/*.pid" >/dev/null; then
    sl_msg "note: $SL_STATE_LEGACY/pids has records of an older up.sh; to stop those daemons run: SLURM_LOCAL_DIR=$SL_STATE_LEGACY $0"
fi
if [[ ! -d "$SL_STATE" ]]; then
    sl_msg "nothing to stop ($SL_STATE does not exist)"
    exit 0
fi
sl_init_paths
[[ -d "$SL_PIDS" ]] || {
    sl_msg "nothing to stop (no PID records)"
    exit 0
}

exec 9>"$SL_STATE/.lock"
flock -w 300 9 || sl_die "timed out waiting for $SL_STATE/.lock (another up.sh/down.sh running?)"

for ((i = ${#SL_DAEMONS[@]} - 1; i >= 0; i--)); do
    name="${SL_DAEMONS[i]}"
    t="$(sl_now)"
    pid="$(sl_recorded_pid "$name" || true)"
    if sl_stop "$name" 30; then
        sl_msg "$name: stopped (pid $pid) ($(sl_since "$t"))"
    elif pid="$(sl_any_pid "$name")"; then
        sl_msg "$name: not started by up.sh (pid $pid), left running"
    else
        sl_msg "$name: not running"
    fi
done
sl_msg "down ($(sl_since "$T_START"))"
