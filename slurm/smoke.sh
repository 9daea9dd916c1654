#!/usr/bin/env bash
# make slurm-smoke: submit the real phase-1 script to the local cluster with the small preset on
# the embedded model (GPU and partition requests overridden), wait, and check the merged table.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR="results/slurm-smoke"
rm -rf "$RUN_DIR"
mkdir -p results/slurm-logs
t0=$(date +%s)
JOB=$(sbatch --parsable --wait --partition=debug --gpus-per-node=0 --mem=3G --cpus-per-task=2 \
    slurm/submit_phase1_large.sh experiment=phase1_small "run_dir=$RUN_DIR" progress=false)
echo "job $JOB finished in $(( $(date +%s) - t0 )) s: $(sacct -j "$JOB" -X -n -P -o State)"
.venv/bin/python - "$RUN_DIR" <<'PY'
import sys
import pandas as pd
df = pd.read_parquet(f"{sys.argv[1]}/results.parquet")
assert len(df) == 48 and df.cell_id.is_unique, (len(df), df.cell_id.nunique())
print(f"ok: {len(df)} rows, one per cell, in {sys.argv[1]}/results.parquet")
PY
