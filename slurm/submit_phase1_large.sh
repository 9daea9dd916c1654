#!/bin/bash
# Phase-1 steering sweep on one big GPU node: loads Llama-3-70B-Instruct once (90% of each GPU,
# CPU spill), runs the whole layer x alpha x prompt grid, writes results/phase1_large-<hash>/.
#
#   sbatch slurm/submit_phase1_large.sh                          # 8 GPUs, the phase1_large preset
#   sbatch --gpus-per-node=4 slurm/submit_phase1_large.sh        # 4-GPU variant (70B fits 4 x 80 GB)
#   sbatch --array=0-3 slurm/submit_phase1_large.sh              # 4 replicas, each a quarter of the batches
#   sbatch --array=0-3%1 slurm/submit_phase1_large.sh            # the same, one task at a time
#   sbatch slurm/submit_phase1_large.sh 'steering.alphas=[0,2]'  # extra args are Hydra overrides
#   # the local test cluster (no GPUs), embedded model:
#   sbatch --partition=debug --gpus-per-node=0 --mem=4G --cpus-per-task=2 \
#       slurm/submit_phase1_large.sh experiment=phase1_small
#
# Command-line sbatch options override the #SBATCH lines below. Preemption, time limit or
# `scontrol requeue`: the job is requeued and resumes from the part files already written.
#SBATCH --job-name=steer-phase1
#SBATCH --partition=gpu                 # GPU partition (override with --partition)
#SBATCH --nodes=1                       # one node: the model is loaded once per job
#SBATCH --ntasks-per-node=1             # one process drives all GPUs (device_map=auto)
#SBATCH --gpus-per-node=8               # 8 x H100-80GB; 4 also fit the 70B in bf16
#SBATCH --cpus-per-task=32              # tokenization, CPU spill, data loading
#SBATCH --mem=0                         # all the node's RAM (CPU spill budget lives here)
#SBATCH --time=24:00:00                 # wall clock; requeued and resumed if it runs out
#SBATCH --signal=B:USR2@120             # 120 s before the end, USR2 to this script: requeue
#SBATCH --requeue                       # preempted or requeued jobs start again and resume
#SBATCH --output=results/slurm-logs/%x-%A_%a.out  # one log per job (and array task)
#SBATCH --open-mode=append              # a requeued job appends to the same log

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON="${PYTHON:-.venv/bin/python}"     # the project's venv (make setup)
JOB_TAG="${SLURM_JOB_NAME:-steer}-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}_${SLURM_ARRAY_TASK_ID:-0}"
LOG_DIR="results/slurm-logs/${JOB_TAG}"  # Hydra's resolved config and logs for this job
mkdir -p "$LOG_DIR"

# Requeue on the warning signal; the Python process is killed by the requeue and the next start
# skips every cell already written (part files are atomic).
requeue() {
    echo "[$(date +%T)] USR2: time limit near, requeueing job ${SLURM_JOB_ID:-?}"
    scontrol requeue "${SLURM_JOB_ID}"
}
trap requeue USR2

echo "[$(date +%T)] job ${SLURM_JOB_ID:-local} on $(hostname) restart ${SLURM_RESTART_COUNT:-0}, args: $*"
# Run in the background and wait, so the shell can take the signal while Python runs.
# shard_count=auto: an array job (--array=0-3) splits the planned batches between its tasks; a
# plain job runs them all. Any task can be rerun or requeued: it redoes only its own missing batches.
"$PYTHON" run_experiment.py experiment=phase1_large shard_count=auto "hydra.run.dir=$LOG_DIR" "$@" &
PID=$!
wait "$PID" || STATUS=$?
# `wait` returns early (status > 128) when a trapped signal arrives: keep waiting for Python.
while kill -0 "$PID" 2>/dev/null; do wait "$PID" || STATUS=$?; done
exit "${STATUS:-0}"
