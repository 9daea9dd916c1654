"""Slow: kill -9 a real sweep at random moments, restart, and demand the uninterrupted table.
Also: stalls while loading or generating are stopped by the watchdogs with a stack dump."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import PRESET, ROOT

pytestmark = [pytest.mark.faults, pytest.mark.slow]
COMPARE = ["cell_id", "layer", "alpha", "prompt_id", "completion", "n_new_tokens", "stop_reason"]


def start(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run_experiment.py", PRESET, f"run_dir={run_dir}", "progress=false",
         "generation.batch_size=4", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def phase(run_dir: Path) -> str:
    parts = run_dir / "parts"
    if list(parts.glob(".part-*.tmp")):
        return "writing a part"
    if list(parts.glob("part-*.parquet")):
        return "generating"
    if (run_dir / "vectors.safetensors").exists():
        return "scoring/first batch"
    return "loading"


def test_kill_nine_at_random_moments_then_resume(direct, tmp_path):
    rng = random.Random(int(os.environ.get("FAULT_SEED", "1234")))
    run_dir = tmp_path / "run"
    kills: list[tuple[float, str, int]] = []
    # Widen the window between a part's tmp file and its rename so some kills land mid-write.
    env = {"STEERSWEEP_FAULT_STALL_WRITE": "0.4"}
    for i in range(12):
        p = start(run_dir, env=env)
        delay = rng.uniform(1.0, 16.0) if i < 4 else rng.uniform(8.0, 24.0)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            where = phase(run_dir)
            p.send_signal(signal.SIGKILL)
            p.wait()
            n = len(list((run_dir / "parts").glob("part-*.parquet"))) if (run_dir / "parts").exists() else 0
            kills.append((round(delay, 1), where, n))
            continue
        assert p.returncode == 0, p.stderr.read()[-3000:]
        break  # finished before the kill: fine, the rest of the loop has nothing to do
    p = start(run_dir)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    print("\nkills (seconds after start, phase, parts present):", kills)
    assert len(kills) >= 10, kills
    assert {k[1] for k in kills} >= {"loading", "generating"}, kills
    df = pd.read_parquet(run_dir / "results.parquet")
    assert df.cell_id.is_unique and len(df) == len(direct)
    ours = df.sort_values("cell_id")[COMPARE].reset_index(drop=True)
    ref = direct.sort_values("cell_id")[COMPARE].reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, ref)  # identical greedy completions, every cell once
    frames = [pd.read_parquet(f) for f in (run_dir / "parts").glob("part-*.parquet")]
    assert sum(len(f) for f in frames) == len(df)  # no part duplicated a finished cell


@pytest.mark.parametrize(
    "point, override", [("load", "memory.load_timeout_s=2"), ("batch", "memory.batch_timeout_s=2")]
)
def test_watchdog_dumps_stacks_and_exits_on_stall(tmp_path, point, override):
    p = start(tmp_path / "run", override, "eval.metrics=[]", env={f"STEERSWEEP_FAULT_STALL_{point.upper()}": "120"})
    t0 = time.time()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, err[-2000:]
    assert time.time() - t0 < 120  # stopped by the watchdog, not by the stall ending
    assert "has run for over 2 s: dumping all thread stacks" in err
    assert "fault_point" in err and "Thread 0x" in err  # the stack shows where it hung
    assert not (tmp_path / "run" / "results.parquet").exists()
