#!/usr/bin/env bash
# End-to-end check of a running local cluster (about 30 s): sbatch --wait,
# a job array, scancel -> sacct CANCELLED, --requeue + scontrol requeue, and
# (if the repo venv has submitit) a submitit job.  Uses no environment beyond
# what plain callers have: it unsets SLURM_CONF so /etc/slurm/slurm.conf is used.
set -euo pipefail
unset SLURM_CONF

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/slurm-local-smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }
# wait_until TIMEOUT_S CMD...: poll CMD every 0.1 s
wait_until() {
    local tmo="$1" i
    shift
    for ((i = 0; i < tmo * 10; i++)); do
        "$@" && return 0
        sleep 0.1
    done
    return 1
}
job_state() { squeue -h -j "$1" -o %T 2>/dev/null || true; }
is_running() { [[ "$(job_state "$1")" == RUNNING ]]; }
acct_state() { sacct -j "$1" -n -X -P -o State 2>/dev/null | tail -n1; }
is_acct() { [[ "$(acct_state "$1")" == "$2"* ]]; }
is_restarted_and_running() {
    is_running "$1" && scontrol show job "$1" 2>/dev/null | grep -q 'Restarts=1'
}

# The real job scripts ask for partition gpu / 8 GPUs / all memory; the
# command line must override that.
cat >job.sh <<'EOF'
#!/bin/bash
#SBATCH --partition=gpu --gpus-per-node=8 --mem=0
echo "task=${SLURM_ARRAY_TASK_ID:-none} restarts=${SLURM_RESTART_COUNT:-0}"
EOF
OVR=(--partition=debug --gpus-per-node=0)

t="$(now)"
sbatch --wait "${OVR[@]}" --mem=1G --wrap 'echo hi' >/dev/null || fail "sbatch --wait --wrap"
grep -qx hi slurm-*.out || fail "wrap job output"
echo "smoke: sbatch --wait --wrap ok ($(since "$t"))"

t="$(now)"
jid="$(sbatch --parsable --wait --array=0-2 "${OVR[@]}" --mem=2G job.sh)" || fail "array job"
for i in 0 1 2; do
    grep -qx "task=$i restarts=0" "slurm-${jid}_$i.out" || fail "array task $i output"
done
echo "smoke: --array=0-2 of a #SBATCH --partition=gpu script ok ($(since "$t"))"

if sbatch "${OVR[@]}" --mem=100000G --wrap true >/dev/null 2>&1; then
    fail "impossible --mem was accepted"
fi
echo "smoke: impossible request refused at submit"

t="$(now)"
jid="$(sbatch --parsable "${OVR[@]}" --mem=1G --wrap 'sleep 60')"
wait_until 20 is_running "$jid" || fail "sleep job $jid never ran"
scancel "$jid"
wait_until 10 is_acct "$jid" CANCELLED || fail "sacct says '$(acct_state "$jid")' for cancelled job $jid"
echo "smoke: scancel -> sacct '$(acct_state "$jid")' ok ($(since "$t"))"

t="$(now)"
jid="$(sbatch --parsable --requeue "${OVR[@]}" --mem=1G \
    --wrap 'echo restarts=${SLURM_RESTART_COUNT:-0}; sleep 3')"
wait_until 20 is_running "$jid" || fail "requeue job $jid never ran"
scontrol requeue "$jid" || fail "scontrol requeue $jid"
wait_until 60 is_restarted_and_running "$jid" || fail "job $jid not running again after requeue"
wait_until 30 is_acct "$jid" COMPLETED || fail "requeued job $jid ended '$(acct_state "$jid")'"
grep -qx 'restarts=1' "slurm-$jid.out" || fail "requeued job output"
echo "smoke: --requeue + scontrol requeue ok ($(since "$t"))"

PY="$REPO_ROOT/.venv/bin/python"
if [[ -x "$PY" ]] && "$PY" -c 'import submitit' 2>/dev/null; then
    t="$(now)"
    "$PY" - "$WORK/submitit" <<'EOF' || fail "submitit job"
import sys, submitit
ex = submitit.AutoExecutor(folder=sys.argv[1], cluster="slurm")
# timeout_min >= 3: submitit's default --signal=USR2@90 plus Slurm's 30 s
# check period would "time out" a 2-minute job almost at once.
ex.update_parameters(slurm_partition="debug", timeout_min=3, mem_gb=1)
def answer():
    return 42
assert ex.submit(answer).result() == 42
EOF
    echo "smoke: submitit result 42 ok ($(since "$t"))"
else
    echo "smoke: submitit not found in $PY, skipped"
fi
echo "smoke: all ok"
