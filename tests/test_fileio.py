"""Atomic writes and exclusive claims (core.fileio): races between real processes, stale tmp files of dead
writers, the umask on private writers."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import torch

from steersweep.core.fileio import claim, clean_stale_tmp


def _race(path: str, text: str, start: float, out) -> None:
    while time.time() < start:  # all processes leave the gate together
        pass
    out.put((text, claim(Path(path), text)))


def test_exactly_one_of_many_concurrent_claims_wins(tmp_path):
    path = tmp_path / "plan.json"
    q = mp.get_context("fork").Queue()
    start = time.time() + 0.5
    procs = [mp.get_context("fork").Process(target=_race, args=(str(path), f"claim {i}", start, q)) for i in range(8)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    winners = [t for t, won in results if won]
    assert len(winners) == 1
    assert path.read_text() == winners[0]  # the loser never sees a partial file
    assert not list(tmp_path.glob(".*.tmp"))


def test_stale_tmp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import socket

    host = socket.gethostname().replace(".", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    files = {
        "dead": tmp_path / f".part-x.parquet.{host}.{dead.pid}.abcd1234.tmp",
        "live": tmp_path / f".part-y.parquet.{host}.{os.getpid()}.abcd1234.tmp",
        "other_host": tmp_path / f".part-z.parquet.elsewhere.{dead.pid}.abcd1234.tmp",
        "old_style": tmp_path / ".part-w.parquet.abcd1234.tmp",
    }
    for f in files.values():
        f.write_text("x")
    old = files["old_style"]
    os.utime(old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    removed = set(clean_stale_tmp(tmp_path))
    assert removed == {files["dead"], old}
    assert files["live"].exists() and files["other_host"].exists()


def test_atomic_writer_applies_the_umask_to_private_writers(tmp_path):
    from safetensors.torch import save_file

    from steersweep.core.fileio import atomic_write_bytes

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "v.safetensors", lambda t: save_file({"a": torch.zeros(2)}, str(t)))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "v.safetensors").stat().st_mode) == 0o640
