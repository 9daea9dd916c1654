"""Real Slurm (slurm/local/up.sh): the real submit script, arrays, scancel + resubmit, requeue,
and Hydra's submitit launcher, all on the embedded model. Tables must equal a direct run's."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import PRESET, ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
LOCAL = ["--partition=debug", "--gpus-per-node=0", "--mem=3G", "--cpus-per-task=2"]  # 2 threads: the cores
COMPARE = ["cell_id", "layer", "alpha", "prompt_id", "sample", "completion", "n_new_tokens", "stop_reason"]


def sh(*cmd: str, timeout: int = 60, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}")
    return r


@pytest.fixture(scope="module")
def cluster():
    sh("bash", "slurm/local/up.sh", timeout=300)


def sbatch(tmp: Path, *args: str, wait: bool = True, sbatch_opts: tuple[str, ...] = ()) -> str:
    opts = [*LOCAL, f"--output={tmp}/slurm-%A_%a.out", *sbatch_opts] + (["--wait"] if wait else [])
    r = sh("sbatch", "--parsable", *opts, "slurm/submit_phase1_large.sh", PRESET, *args, "progress=false",
           timeout=900)  # fmt: skip
    return r.stdout.strip().split(";")[0]


def state(job: str) -> str:
    r = sh("sacct", "-j", job, "-X", "-n", "-P", "-o", "State", check=False)
    return (r.stdout.strip().splitlines() or ["PENDING"])[0].split()[0]


def wait_for(pred, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_same_table(run_dir: Path, direct: pd.DataFrame) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "results.parquet")
    assert df.cell_id.is_unique
    ours = df.sort_values("cell_id")[COMPARE].reset_index(drop=True)
    ref = direct.sort_values("cell_id")[COMPARE].reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, ref)
    for col in ("behavior_prob", "perplexity"):
        a = df.sort_values("cell_id")[col].to_numpy()
        b = direct.sort_values("cell_id")[col].to_numpy()
        assert abs(a - b).max() < 1e-3, col
    return df


def test_submit_script_matches_direct_run(cluster, direct, tmp_path):
    run_dir = tmp_path / "with space's" / "run"  # hostile path through sbatch and Hydra
    t0 = time.time()
    job = sbatch(tmp_path, f'run_dir="{run_dir}"')  # Hydra syntax: double quotes hold the apostrophe
    print(f"sbatch job {job}: {time.time() - t0:.1f} s")
    assert state(job) == "COMPLETED"
    df = assert_same_table(run_dir, direct)
    assert len(df) == 48
    log = next(tmp_path.glob("slurm-*.out")).read_text()
    assert "48 rows in" in log


def test_array_tasks_split_cells_and_merge(cluster, direct, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(tmp_path, f"run_dir={run_dir}", sbatch_opts=("--array=0-1", "--cpus-per-task=1"))  # 1 core each
    assert state(job) == "COMPLETED"
    df = assert_same_table(run_dir, direct)
    assert set(df.worker) == {"s0of2", "s1of2"}  # each array task wrote its own share


def test_scancel_halfway_then_resubmit(cluster, direct, tmp_path):
    run_dir = tmp_path / "run"
    parts = run_dir / "parts"
    job = sbatch(tmp_path, f"run_dir={run_dir}", "generation.batch_size=4", wait=False)
    wait_for(lambda: len(list(parts.glob("part-*.parquet"))) >= 2, 300, "two part files")
    sh("scancel", job)
    wait_for(lambda: state(job).startswith("CANCELLED"), 60, "CANCELLED")
    n_parts = len(list(parts.glob("part-*.parquet")))
    assert not (run_dir / "results.parquet").exists() and n_parts < 12
    job2 = sbatch(tmp_path, f"run_dir={run_dir}", "generation.batch_size=4")
    assert state(job2) == "COMPLETED"
    df = assert_same_table(run_dir, direct)
    print(f"cancelled {job} after {n_parts} parts; {job2} finished the rest: {len(df)} rows, each once")


def test_requeue_resumes(cluster, direct, tmp_path):
    run_dir = tmp_path / "run"
    parts = run_dir / "parts"
    job = sbatch(tmp_path, f"run_dir={run_dir}", "generation.batch_size=4", wait=False)
    wait_for(lambda: len(list(parts.glob("part-*.parquet"))) >= 1, 300, "a part file")
    sh("scontrol", "requeue", job)
    wait_for(lambda: state(job) == "COMPLETED", 600, "the requeued job to complete")
    log = next(tmp_path.glob("slurm-*.out")).read_text()
    assert "restart 1" in log
    assert_same_table(run_dir, direct)


def test_hydra_submitit_launcher_shards(cluster, direct, tmp_path):
    """`-m` with the submitit Slurm launcher: two shard jobs via submitit, one merged table."""
    run_dir = tmp_path / "run"
    sh(sys.executable, "run_experiment.py", "-m", "hydra/launcher=local_slurm", PRESET, f"run_dir={run_dir}",
       "shard_count=2", "shard_index=0,1", f"hydra.sweep.dir={tmp_path}/sweep", "progress=false",
       timeout=900)  # fmt: skip
    df = assert_same_table(run_dir, direct)
    assert set(df.worker) == {"s0of2", "s1of2"}
