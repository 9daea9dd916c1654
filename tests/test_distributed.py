"""Slow: data parallel inside a node, 2 real gloo processes under torchrun (field report 01)."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from conftest import PRESET, ROOT

pytestmark = pytest.mark.slow


def test_torchrun_two_ranks_equal_single_process(direct, tmp_path):
    run_dir = tmp_path / "dp"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "run_experiment.py", PRESET, "data_parallel=true", f"run_dir={run_dir}", "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert "rank 1/2" in r.stdout + r.stderr  # two ranks really ran
    df = pd.read_parquet(run_dir / "results.parquet")
    assert df.cell_id.is_unique and len(df) == len(direct)
    cols = ["cell_id", "completion", "n_new_tokens"]
    a = df.sort_values("cell_id")[cols].reset_index(drop=True)
    b = direct.sort_values("cell_id")[cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert set(df.worker) == {"s0of1r0", "s0of1r1"}  # each row says which rank generated it
    assert {p.name.split("-")[1] for p in (run_dir / "parts").glob("part-*.parquet")} == {"dp"}  # rank 0 wrote
