"""A run's ending (pipeline.finish): task=status on a half-done sharded folder names what is missing and
how to finish it."""

from __future__ import annotations

import subprocess
import sys

from helpers.checkout import ROOT, cli
from helpers.config import make

from steersweep.runs.folder import RunFolder
from steersweep.runs.grid import Grid, expand
from steersweep.runs.identity import identity, identity_hash


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
    r = cli("task=status", f'run_dir="{run}"')  # Hydra's quoting: the path has a quote
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
