#!/bin/bash
# One process per GPU: G tasks on one node, each bound to its own GPU, each a worker of the plan.
# For models whose replica fits on one GPU (`task=plan` says "a replica fits on one GPU"): 8B in bf16
# on 80 GB cards. No torchrun and no process group: task t of G (SLURM_PROCID of SLURM_NTASKS)
# takes planned batches t, t+G, ... (times the array's shards), writes its own part files, and the
# last one to finish merges the table. A failed or preempted task leaves its batches to a rerun.
#
#   sbatch slurm/submit_per_gpu.sh model=llama8b                     # 8 tasks x 1 GPU; args are Hydra overrides
#   sbatch --ntasks-per-node=4 slurm/submit_per_gpu.sh model=llama8b # 4 GPUs
#   sbatch --array=0-1 slurm/submit_per_gpu.sh model=llama8b         # 2 nodes' worth, as 2 array tasks
#   # the local test cluster (no GPUs): CPU tasks stand in for GPU-bound ones
#   sbatch --partition=debug --gpus-per-task=0 --ntasks-per-node=2 --cpus-per-task=1 --mem=6G \
#       slurm/submit_per_gpu.sh experiment=phase1_small
#SBATCH --job-name=steer-per-gpu
#SBATCH --partition=gpu                 # GPU partition (override with --partition)
#SBATCH --nodes=1                       # the tasks share one node
#SBATCH --ntasks-per-node=8             # one task per GPU
#SBATCH --gpus-per-task=1               # each task sees only its GPU (CUDA_VISIBLE_DEVICES)
#SBATCH --cpus-per-task=8               # tokenization and data per task
#SBATCH --mem=0                         # all the node's RAM (each task loads its own replica)
#SBATCH --time=24:00:00                 # wall clock; requeued and resumed if it runs out
#SBATCH --signal=B:USR2@120             # 120 s before the end, USR2 to this script: requeue
#SBATCH --requeue                       # preempted or requeued jobs start again and resume
#SBATCH --output=results/slurm-logs/%x-%A_%a.out  # one log per job (and array task)
#SBATCH --open-mode=append              # a requeued job appends to the same log

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON="${PYTHON:-.venv/bin/python}"     # the project's venv (make setup)
JOB_TAG="${SLURM_JOB_NAME:-steer}-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}_${SLURM_ARRAY_TASK_ID:-0}"
LOG_DIR="results/slurm-logs/${JOB_TAG}"  # Hydra's resolved config and logs, one folder per task
mkdir -p "$LOG_DIR"

requeue() {
    echo "[$(date +%T)] USR2: time limit near, requeueing job ${SLURM_JOB_ID:-?}"
    scontrol requeue "${SLURM_JOB_ID}"
}
trap requeue USR2

echo "[$(date +%T)] job ${SLURM_JOB_ID:-local} on $(hostname): ${SLURM_NTASKS:-1} tasks, args: $*"
# data_parallel=true: each srun task is one worker (distributed.Dist.slurm_tasks); shard_count=auto
# adds the array's shards on top. Hydra resolves SLURM_PROCID in each task: one log folder per task.
srun --kill-on-bad-exit=0 "$PYTHON" run_experiment.py \
    data_parallel=true shard_count=auto "hydra.run.dir=$LOG_DIR/task\${oc.env:SLURM_PROCID,0}" "$@" &
PID=$!
wait "$PID" || STATUS=$?
# `wait` returns early (status > 128) when a trapped signal arrives: keep waiting for srun.
while kill -0 "$PID" 2>/dev/null; do wait "$PID" || STATUS=$?; done
exit "${STATUS:-0}"
