"""Fast: the run folder's claim (races between real processes), default folder names, task=status,
leftover tmp files, and the `-m` command-line precheck."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

from test_config import make

from steersweep.core.fileio import claim, clean_stale_tmp
from steersweep.runs.folder import RunFolder
from steersweep.runs.grid import Grid, expand
from steersweep.runs.identity import folder_for, identity, identity_hash

ROOT = Path(__file__).resolve().parents[1]


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


def test_default_folders_differ_by_config_and_are_readable(tmp_path, monkeypatch):
    a, b, c = make(), make("generation.max_new_tokens=5"), make("generation.batch_size=3")
    ha, hb, hc = (identity_hash(identity(x)) for x in (a, b, c))
    assert ha != hb and ha == hc  # batching never changes a row, decoding does
    fa = folder_for(a, ha)
    assert fa.name == f"smollm2_135m-sentiment-{ha}" and fa.parent == Path.cwd() / "results"
    monkeypatch.chdir(tmp_path)  # ./results of the folder the command runs in, wherever the package is
    assert folder_for(a, ha) == tmp_path / "results" / fa.name
    assert folder_for(make("run_name=mine"), ha).name == f"mine-{ha}"
    assert folder_for(make("run_dir=/x/y"), ha) == Path("/x/y")
    # the identity hash is part of every cell id: two configs never share a cell id
    prompts = [{"id": "p", "prompt": "hi"}]
    assert not {c.cell_id for c in expand(Grid.of(a), prompts, ha)} & {
        c.cell_id for c in expand(Grid.of(b), prompts, hb)
    }


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


def _run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "run_experiment.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def test_status_of_a_half_done_sharded_folder(tmp_path, capsys):
    """Shard 0 of 2 finished, shard 1 never ran: status names what is missing and how to finish."""
    from steersweep.runs.grid import deal
    from steersweep.runs.planfile import claim_plan

    run = tmp_path / "run's dir"
    cfg = make("experiment=quick", "generation.batch_size=4", f'run_dir="{run}"')
    ident = identity(cfg)
    h = identity_hash(ident)
    prompts = [{"id": f"p{i}", "prompt": "x"} for i in range(4)]
    folder = RunFolder(run)
    folder.create()
    plan = claim_plan(Grid.of(cfg), run, expand(Grid.of(cfg), prompts, h), ident, h)
    for b in deal(plan.batches, 0, 2):
        folder.write_part([{"cell_id": c.cell_id, "worker": "s0of2"} for c in b.cells], "s0of2")
    r = _run("task=status", f'run_dir="{run}"')  # Hydra's quoting: the path has a quote
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    # 4 prompts x (one baseline decode for both layers' alpha 0 + 2 steered) = 12 decodes: 3 batches of 4
    # decodes holding 6, 5 and 5 cells; shard 0 has b00000 and b00002
    assert "cells present: 11/16; batches complete: 2/3" in out
    assert "shard 0 of 2: 11/11 cells, 2/2 batches" in out and "shard 1 of 2: 0/5 cells, 0/1 batches" in out
    assert "missing: 5 cells in batches b00001 " in out
    cmd = out.split("finish with: ")[1].splitlines()[0].strip()
    assert cmd.startswith("python run_experiment.py experiment=quick generation.batch_size=4") or "run_dir" in cmd
    # the printed command works as printed: run through a shell, it reaches the same folder
    r2 = subprocess.run(cmd.replace("python", f"{sys.executable}", 1).replace("run_experiment.py", "run_experiment.py task=status", 1),
                        shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r2.returncode == 0 and "cells present: 11/16" in r2.stdout, r2.stderr[-2000:]
    # a worker that ends before the others prints a status command that works as printed too
    from steersweep.pipeline.finish import finish

    said = "\n".join(finish(cfg, folder, plan, 11)["said"])
    see = said.split("see: ")[1].splitlines()[0].strip()
    r3 = subprocess.run(see.replace("python", f"{sys.executable}", 1), shell=True, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)  # fmt: skip
    assert r3.returncode == 0 and "cells present: 11/16" in r3.stdout, (see, r3.stderr[-2000:])


def test_multirun_bad_value_is_one_line_before_anything_is_submitted(tmp_path):
    r = _run("-m", "experiment=quick", "prompts.limit=2,0", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: job 1 (experiment=quick prompts.limit=0 "
        f"hydra.sweep.dir={tmp_path}/sweep): prompts.limit=0 must be >= 1 (or null for every prompt)"
    ]
    assert not (tmp_path / "sweep").exists()  # nothing was launched


def test_multirun_jobs_into_one_folder_refused(tmp_path):
    r = _run("-m", "experiment=quick", "prompts.limit=2,3", f"run_dir={tmp_path / 'one'}")
    assert r.returncode == 2
    assert "error: jobs 0 and 1 of this sweep would write different configs into one folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_multirun_shard_count_auto_refused(tmp_path):
    r = _run("-m", "experiment=quick", "shard_count=auto", "prompts.limit=2,3")
    assert r.returncode == 2
    assert "shard_count=auto in a -m sweep would split every job's grid" in r.stderr


def test_editing_an_input_file_is_another_identity(tmp_path):
    """Same path, other content: a resume must not mix rows made from the old and the new text."""
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"id": "a", "prompt": "Hello"}\n')
    before = identity(make(f"prompts.dataset={f}"))
    f.write_text('{"id": "a", "prompt": "Goodbye"}\n')
    after = identity(make(f"prompts.dataset={f}"))
    assert identity_hash(before) != identity_hash(after)
    from steersweep.runs.identity import differing_keys

    assert differing_keys(before, after) == ["input_files.prompts"]
