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


# A longer sweep than the shared preset (16 prompts -> 128 cells) written 2 rows per part while
# being killed, so a dozen kills each lose little and the sweep is still unfinished after them.
# The reference and the final run use the automatic batch size: batching never changes a row.
LONG = ["prompts.limit=16"]


def start(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run_experiment.py", PRESET, f"run_dir={run_dir}", "progress=false", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def phase(run_dir: Path, log: str, parts_before: int) -> str:
    """Where the killed run was, from its own log and the files it left."""
    parts = run_dir / "parts"
    if list(parts.glob(".part-*.tmp")):
        return "writing a part"
    if len(list(parts.glob("part-*.parquet"))) > parts_before or "generating" in log:
        return "generating"
    if "loaded" in log:
        return "vectors"
    return "loading"


def count_parts(run_dir: Path) -> int:
    return len(list((run_dir / "parts").glob("part-*.parquet"))) if (run_dir / "parts").exists() else 0


def test_kill_nine_at_random_moments_then_resume(tmp_path):
    ref = start(tmp_path / "reference", *LONG)
    out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, out[-3000:]
    reference = pd.read_parquet(tmp_path / "reference" / "results.parquet")

    rng = random.Random(int(os.environ.get("FAULT_SEED", "1234")))
    run_dir = tmp_path / "run"
    kills: list[tuple[float, str, int]] = []
    # Widen the window between a part's tmp file and its rename so some kills land mid-write.
    env = {"STEERSWEEP_FAULT_STALL_WRITE": "0.4"}
    for _ in range(12):
        before = count_parts(run_dir)
        p = start(run_dir, *LONG, "generation.batch_size=2", env=env)
        delay = rng.uniform(1.0, 40.0)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            log, _ = p.communicate()
            kills.append((round(delay, 1), phase(run_dir, log, before), count_parts(run_dir)))
            continue
        assert p.returncode == 0, p.stdout.read()[-3000:]
        break  # finished before its kill: the loop has nothing left to interrupt
    final = start(run_dir, *LONG)
    out, _ = final.communicate(timeout=900)
    assert final.returncode == 0, out[-3000:]
    print("\nkills (seconds after start, phase, parts present after):", kills)
    assert len(kills) >= 10, kills
    assert {k[1] for k in kills} >= {"loading", "generating"}, kills
    df = pd.read_parquet(run_dir / "results.parquet")
    assert df.cell_id.is_unique and len(df) == len(reference) == 128
    ours = df.sort_values("cell_id")[COMPARE].reset_index(drop=True)
    theirs = reference.sort_values("cell_id")[COMPARE].reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, theirs)  # identical greedy completions, every cell once
    frames = [pd.read_parquet(f) for f in (run_dir / "parts").glob("part-*.parquet")]
    assert sum(len(f) for f in frames) == len(df)  # no part duplicated a finished cell


@pytest.mark.parametrize(
    "point, override", [("load", "memory.load_timeout_s=2"), ("batch", "memory.batch_timeout_s=2")]
)
def test_watchdog_dumps_stacks_and_exits_on_stall(tmp_path, point, override):
    p = start(
        tmp_path / "run",
        override,
        "eval.metrics=[]",
        "generation.batch_size=4",
        env={f"STEERSWEEP_FAULT_STALL_{point.upper()}": "120"},
    )
    t0 = time.time()
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 3, out[-2000:]
    assert time.time() - t0 < 120  # stopped by the watchdog, not by the stall ending
    assert "has run for over 2 s: dumping all thread stacks" in out
    assert "fault_point" in out and "Thread 0x" in out  # the stack shows where it hung
    assert not (tmp_path / "run" / "results.parquet").exists()
