"""Slow: kill -9 a real sweep at chosen moments, restart, and demand the uninterrupted table.
Also: stalls while loading or generating are stopped by the watchdogs with a stack dump.

The kill test schedules every kill by an event it observes in the killed process itself (a log
line, the parts count, a temporary file carrying that process's PID), never by wall-clock guesses,
so it neither depends on the machine's speed nor labels a kill from another process's leftovers."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers.checkout import ROOT
from helpers.config import PRESET

pytestmark = [pytest.mark.faults, pytest.mark.slow]
COMPARE = ["cell_id", "layer", "alpha", "prompt_id", "completion", "n_new_tokens", "stop_reason"]


# A longer sweep than the shared preset (16 prompts -> 128 cells) written 2 rows per part while
# being killed (64 batches), so each kill loses at most one batch and the sweep is still unfinished
# after all of them (at most KILLS x (3 + 1) parts are written before the last kill).
# In bfloat16, whatever the CPU: a row is a function of its cell and its planned batch (not of which
# run made it), so the killed-and-resumed table must equal an uninterrupted run of the same plan row
# for row. (Across different batch plans only float32 is exact: tests/test_generation.py.)
LONG = ["prompts.limit=16", "model.dtype=bfloat16"]
KILLED_BATCH = ["generation.batch_size=2"]
N_BATCHES = 64
KILLS = 10
PHASES = ("loading", "after part k", "inside a write")
POLL_S = 0.05
EVENT_TIMEOUT_S = 600  # an event not seen by then is a hang, not a slow machine
STALL_LOAD_S = 2  # the loading window: between "memory budget:" and "loaded ... in ... s"
STALL_WRITE_S = 10  # a part's tmp file lives this long before its rename: 200 polls to see it
LOADED = re.compile(r"\] - loaded .* in [\d.]+ s")
# One OpenMP thread per sweep process, for the reference, the killed and the final runs alike (so
# their rows stay comparable): on a shared machine, oversubscribed OpenMP threads spin against
# each other and slow a run many-fold (see app.set_threads).
THREADS = {"OMP_NUM_THREADS": "1"}
RUN_TIMEOUT_S = 1800  # a whole run on a busy 2-core machine


def start(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run_experiment.py", PRESET, f"run_dir={run_dir}", "progress=false", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )  # fmt: skip


def count_parts(run_dir: Path) -> int:
    return len(list((run_dir / "parts").glob("part-*.parquet"))) if (run_dir / "parts").exists() else 0


def tmp_files(run_dir: Path, pid: int | None = None) -> set[str]:
    """Temporary files in parts/ (`.<part>.<host>.<pid>.<uuid>.tmp`), only `pid`'s if given."""
    folder = run_dir / "parts"
    names = {p.name for p in folder.glob(".*.tmp")} if folder.exists() else set()
    return names if pid is None else {n for n in names if n.split(".")[-3:-2] == [str(pid)]}


def assert_parts_readable(run_dir: Path) -> None:
    for f in (run_dir / "parts").glob("part-*.parquet"):
        pq.read_table(f)  # raises on a truncated or half-written part


class Watched:
    """A sweep process whose merged stdout/stderr a thread drains line by line (the pipe never fills)."""

    live: list[subprocess.Popen] = []  # killed at teardown if a failing test leaves one running

    def __init__(self, run_dir: Path, *extra: str, env: dict | None = None):
        self.run_dir, self.lines, self.t0 = run_dir, [], time.monotonic()
        self.p = start(run_dir, *extra, env={**THREADS, **(env or {})})
        Watched.live.append(self.p)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def loaded(self) -> bool:
        return any(LOADED.search(line) for line in list(self.lines))

    def wait_for(self, what: str, event) -> None:
        """Poll until `event()` holds; the run ending first means the schedule is wrong, not the machine."""
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while not event():
            if self.p.poll() is not None:
                self.reader.join(timeout=30)
                pytest.fail(f"run ended (rc {self.p.returncode}) before {what}: test design\n{self.log[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {EVENT_TIMEOUT_S} s\n{self.log[-3000:]}")
            time.sleep(POLL_S)

    def kill(self) -> float:
        seconds = time.monotonic() - self.t0
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()  # reaped: its PID is dead, so the next start may remove its tmp files
        self.reader.join(timeout=30)
        return seconds

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> str:
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run not finished in {timeout} s\n{self.log[-3000:]}")
        self.reader.join(timeout=30)
        assert self.p.returncode == 0, self.log[-3000:]
        return self.log


@pytest.fixture(autouse=True)
def no_orphans():
    yield
    while Watched.live:
        p = Watched.live.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def schedule(rng: random.Random) -> list[dict]:
    """KILLS kills, each phase at least twice, in seeded random order, every parameter drawn up front."""
    phases = [*PHASES, *PHASES] + [rng.choice(PHASES) for _ in range(KILLS - 2 * len(PHASES))]
    rng.shuffle(phases)
    plans = []
    for ph in phases:
        plan = {"phase": ph}
        if ph == "loading":
            plan["delay"] = rng.choice([0.0, rng.uniform(0.0, STALL_LOAD_S / 4)])
        elif ph == "after part k":
            plan["k"] = rng.randint(1, 3)
            plan["delay"] = rng.choice([0.0, rng.uniform(0.0, 0.5)])
        plans.append(plan)
    return plans


def kill_once(run_dir: Path, plan: dict, leftover: set[str]) -> dict:
    """Start a killable run, wait for the planned event in it, kill -9, and check where it landed.

    `leftover`: tmp files of the previous killed writer, which this run must remove on opening."""
    before, tmp_before = count_parts(run_dir), tmp_files(run_dir)
    ph = plan["phase"]
    env = {
        "loading": {"STEERSWEEP_FAULT_STALL_LOAD": str(STALL_LOAD_S)},
        "after part k": {},
        "inside a write": {"STEERSWEEP_FAULT_STALL_WRITE": str(STALL_WRITE_S)},
    }[ph]
    w = Watched(run_dir, *LONG, *KILLED_BATCH, env=env)
    pid = w.p.pid
    assert_cleaned(run_dir, w, leftover)
    if ph == "loading":
        w.wait_for('"memory budget:"', lambda: w.saw("] - memory budget:"))
        time.sleep(plan["delay"])
        seconds = w.kill()
        assert not w.loaded(), f"the loading kill landed after the load finished:\n{w.log[-3000:]}"
        observed = "loading"
    elif ph == "after part k":
        w.wait_for(f"part {before + plan['k']}", lambda: count_parts(run_dir) >= before + plan["k"])
        time.sleep(plan["delay"])
        seconds = w.kill()
        observed = f"after part {count_parts(run_dir) - before}"
        assert count_parts(run_dir) >= before + plan["k"]
    else:
        w.wait_for(f"a tmp file of PID {pid}", lambda: tmp_files(run_dir, pid) - tmp_before)
        seconds = w.kill()
        mine = tmp_files(run_dir, pid)
        # Proof the kill landed inside the write: its own tmp file is still there (never renamed).
        assert mine, f"PID {pid}'s tmp file was renamed before the kill: the write stall is too short"
        assert count_parts(run_dir) == before  # the stalled part never became a part
        observed = "inside a write"
    assert_parts_readable(run_dir)
    return {
        "phase": observed,
        "intended": ph,
        "seconds": round(seconds, 1),
        "parts": count_parts(run_dir),
        "leftover": tmp_files(run_dir, pid),  # this killed writer's tmp files: the next start removes them
    }


def assert_cleaned(run_dir: Path, w: Watched, leftover: set[str]) -> None:
    """Once the next run has opened the folder (it logs "run folder" after the clean), they are gone."""
    w.wait_for('"run folder"', lambda: w.saw("] - run folder "))
    assert not leftover & tmp_files(run_dir), (leftover, tmp_files(run_dir))
    for name in leftover:
        assert f"removed {name}, left by a writer that was killed" in w.log


def test_kill_nine_at_random_moments_then_resume(tmp_path):
    ref = Watched(tmp_path / "reference", *LONG, *KILLED_BATCH)  # the same batch plan, never killed
    ref.finish()
    reference = pd.read_parquet(tmp_path / "reference" / "results.parquet")

    rng = random.Random(int(os.environ.get("FAULT_SEED", "1234")))
    run_dir = tmp_path / "run"
    kills: list[dict] = []
    for plan in schedule(rng):
        # Even if every earlier kill wrote its most, this one's event still comes before the end.
        assert N_BATCHES - count_parts(run_dir) > plan.get("k", 0) + 1, "the sweep is too short for the kills"
        kills.append(kill_once(run_dir, plan, kills[-1]["leftover"] if kills else set()))
    final = Watched(run_dir, *LONG)
    assert_cleaned(run_dir, final, kills[-1]["leftover"])
    final.finish()
    print(f"\nkills (FAULT_SEED={os.environ.get('FAULT_SEED', '1234')}): phase, seconds after start, parts after")
    for i, k in enumerate(kills, 1):
        extra = f" (tmp left: {len(k['leftover'])})" if k["leftover"] else ""
        print(f"  kill {i:2d}: {k['phase']:<15} {k['seconds']:6.1f} s  {k['parts']:3d} parts{extra}")
    print("  tmp files outside parts/:", sorted(p.name for p in run_dir.glob(".*.tmp")) or "none")
    assert len(kills) == KILLS
    assert all((k["intended"] == "after part k") == k["phase"].startswith("after part") for k in kills)
    for ph in ("loading", "after part", "inside a write"):
        assert sum(k["phase"].startswith(ph) for k in kills) >= 2, kills
    assert not tmp_files(run_dir), tmp_files(run_dir)  # no killed writer's tmp file survives
    assert_parts_readable(run_dir)
    df = pd.read_parquet(run_dir / "results.parquet")
    assert df.cell_id.is_unique and len(df) == len(reference) == 128
    ours = df.sort_values("cell_id")[COMPARE].reset_index(drop=True)
    theirs = reference.sort_values("cell_id")[COMPARE].reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, theirs)  # identical greedy completions, every cell once
    cells = pd.concat([pd.read_parquet(f, columns=["cell_id"]) for f in (run_dir / "parts").glob("part-*.parquet")])
    assert cells.cell_id.is_unique and len(cells) == len(df)  # no part duplicated a finished cell
    # the per-item behaviour scores too: the same item table as the uninterrupted run, number for number
    items, ref_items = (pd.read_parquet(d / "items.parquet").drop(columns="worker") for d in (run_dir, ref.run_dir))
    assert len(items) == 2 * 4 * 16  # layers x alphas x behaviour items
    pd.testing.assert_frame_equal(items, ref_items)


STALL_S = 600  # a stall the 2 s watchdogs must cut short


@pytest.mark.parametrize(
    "point, override", [("load", "memory.load_timeout_s=2"), ("batch", "memory.batch_timeout_s=2")]
)
def test_watchdog_dumps_stacks_and_exits_on_stall(tmp_path, point, override):
    p = start(
        tmp_path / "run",
        override,
        "eval.metrics=[]",
        "generation.batch_size=4",
        env={f"STEERSWEEP_FAULT_STALL_{point.upper()}": str(STALL_S)},
    )
    t0 = time.time()
    try:
        out, _ = p.communicate(timeout=STALL_S + 300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 3, out[-2000:]
    # Stopped by the watchdog, not by the stall ending; the stall is long enough that a slow start
    # (imports, computing the vectors on a busy machine) cannot reach its end.
    assert time.time() - t0 < STALL_S
    assert "has run for over 2 s: dumping all thread stacks" in out
    assert "fault_point" in out and "Thread 0x" in out  # the stack shows where it hung
    assert not (tmp_path / "run" / "results.parquet").exists()
