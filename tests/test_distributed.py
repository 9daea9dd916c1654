"""Slow: data parallel inside a node, 2 real gloo processes under torchrun (field report 01)."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from helpers.checkout import ROOT
from helpers.config import FP32, PRESET

pytestmark = pytest.mark.slow
COLS = ["cell_id", "completion", "n_new_tokens"]


def torchrun(run_dir, port: int, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "run_experiment.py", PRESET, FP32, "data_parallel=true", f"run_dir={run_dir}", "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def same_rows(run_dir, direct) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "results.parquet")
    assert df.cell_id.is_unique and len(df) == len(direct)
    a = df.sort_values("cell_id")[COLS].reset_index(drop=True)
    b = direct.sort_values("cell_id")[COLS].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    return df


def test_torchrun_two_ranks_equal_single_process(direct, tmp_path):
    run_dir = tmp_path / "dp"
    r = torchrun(run_dir, 29533)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "worker s0of1r1" in r.stdout + r.stderr  # two ranks really ran
    df = same_rows(run_dir, direct)
    assert set(df.worker) == {"s0of1r0", "s0of1r1"}  # each row says which rank generated it
    assert {p.name.split("-")[1] for p in (run_dir / "parts").glob("part-*.parquet")} == {"s0of1r0", "s0of1r1"}


def test_out_of_memory_on_one_rank_backs_off_without_a_hang(direct, tmp_path):
    """Rank 1 runs out of memory twice and halves its batches; rank 0 does not. Before, the rank
    that halved joined more gathers than the other and both waited forever."""
    run_dir = tmp_path / "dp"
    r = torchrun(run_dir, 29534, {"STEERSWEEP_FAULT_RANK": "1", "STEERSWEEP_FAULT_OOM_BATCH": "2"}, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (r.stdout + r.stderr).count("out of memory with") == 2, r.stdout[-4000:]  # the back-off, on one rank
    df = same_rows(run_dir, direct)
    # a batch's decodes: its cells, a prompt's alpha-0 cells counting once (one baseline decode)
    decode = df.cell_id.where(df.alpha != 0, "baseline|" + df.prompt_id + "|" + df["sample"].astype(str))
    planned = decode.groupby(df.batch_id).transform("nunique")
    cut = df[df.decode_rows < planned]  # the back-off is recorded on the rows it changed, and only there
    assert len(cut) and set(cut.worker) == {"s0of1r1"}, df[["batch_id", "decode_rows", "worker"]]


def test_a_failing_rank_makes_every_rank_exit_with_its_error(tmp_path):
    run_dir = tmp_path / "dp"
    # rank 1 runs out of memory at every size down to one row: it fails; rank 0 must not wait forever
    r = torchrun(run_dir, 29535, {"STEERSWEEP_FAULT_RANK": "1", "STEERSWEEP_FAULT_OOM_BATCH": "1000"}, timeout=600)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "CUDA out of memory. Tried to allocate 2.00 GiB (injected" in out
    assert "data-parallel rank 1 failed" in out  # rank 0's own message
    assert not (run_dir / "results.parquet").exists()
