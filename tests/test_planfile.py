"""Property-based: any schedule of shard starts, kills, requeues, reruns and re-shardings ends with
every cell written, and the merged table holds each exactly once.

The real planning functions (expand, claim_plan, todo) run against a real run folder (real
plan.json claims, real Parquet parts, real merge); only the model is left out: a worker "generates"
a batch by writing its rows. Hypothesis draws the schedule step by step.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from steersweep.runs.folder import RunFolder
from steersweep.runs.grid import Grid, deal, expand, todo
from steersweep.runs.identity import identity_hash
from steersweep.runs.planfile import claim_plan


def grid_cfg(layers, alphas, samples, batch_size):
    return OmegaConf.create(
        {
            "steering": {"layers": layers, "alphas": alphas, "samples": samples},
            "generation": {"seed": 0, "batch_size": batch_size},
            "vectors": {"concept": "c"},
        }
    )


class Incarnation:
    """One start of one worker: it claims the plan, reads what is done, then writes its batches."""

    def __init__(self, folder: RunFolder, cfg, prompts, shard: int, n_shards: int):
        ident = {"grid": OmegaConf.to_container(cfg.steering), "prompts": [p["id"] for p in prompts]}
        h = identity_hash(ident)
        plan = claim_plan(Grid.of(cfg), folder.path, expand(Grid.of(cfg), prompts, h), ident, h)
        self.folder, self.name = folder, f"s{shard}of{n_shards}"
        self.plan = plan
        self.queue = todo(plan.batches, folder.done_cells(), shard, n_shards)
        assert all(b in deal(plan.batches, shard, n_shards) for b in self.queue)

    def step(self) -> bool:
        """Write the next batch as one part; False when there is nothing left."""
        if not self.queue:
            return False
        b = self.queue.pop(0)
        rows = [
            {"cell_id": c.cell_id, "batch_id": b.batch_id, "layer": c.layer, "alpha": c.alpha,
             "prompt_id": c.prompt_id, "sample": c.sample, "completion": f"{c.cell_id}", "worker": self.name}
            for c in b.cells
        ]  # fmt: skip
        self.folder.write_part(rows, self.name)
        return True


@st.composite
def grids(draw):
    layers = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True))
    alphas = draw(st.lists(st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 4.0]), min_size=1, max_size=4, unique=True))
    samples = draw(st.integers(1, 2))
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(draw(st.integers(1, 5)))]
    return layers, alphas, samples, prompts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid=grids(), data=st.data())
def test_any_schedule_ends_with_every_cell_exactly_once(grid, data):
    layers, alphas, samples, prompts = grid
    with tempfile.TemporaryDirectory() as tmp:
        folder = RunFolder(Path(tmp) / "run")
        folder.create()
        first_size = data.draw(st.integers(1, 7), label="planned batch size")
        # Waves: each launches N shards (N may change: re-sharding); within a wave, tasks start
        # late, are throttled, killed after k parts, requeued, or run twice at once.
        for _wave in range(data.draw(st.integers(1, 3), label="waves")):
            n = data.draw(st.integers(1, 4), label="shards")
            live: list[Incarnation] = []
            pending = list(range(n))
            for _ in range(data.draw(st.integers(0, 25), label="steps")):
                action = data.draw(st.sampled_from(["start", "step", "step", "kill", "twin"]), label="action")
                if action == "start" and pending:
                    shard = pending.pop(data.draw(st.integers(0, len(pending) - 1)))
                    size = data.draw(st.sampled_from([first_size, 1, 3]), label="this start's batch_size")
                    live.append(Incarnation(folder, grid_cfg(layers, alphas, samples, size), prompts, shard, n))
                elif action == "twin" and live:  # a requeue while the old one still runs, or a rerun
                    old = data.draw(st.sampled_from(live))
                    shard = int(old.name[1:].split("of")[0])
                    live.append(Incarnation(folder, grid_cfg(layers, alphas, samples, 2), prompts, shard, n))
                elif action == "step" and live:
                    inc = data.draw(st.sampled_from(live))
                    if not inc.step():
                        live.remove(inc)
                elif action == "kill" and live:
                    dead = data.draw(st.sampled_from(live))
                    live.remove(dead)  # kill -9: the rest of its queue is simply lost
                    if data.draw(st.booleans(), label="requeued"):  # Slurm starts it again later
                        pending.append(int(dead.name[1:].split("of")[0]))
        # The end of every schedule: each shard of the last launch runs once more, to completion
        # (a requeue or the user's rerun of the same command). Nothing else may be needed.
        n = data.draw(st.integers(1, 4), label="final shards")
        for shard in data.draw(st.permutations(range(n)), label="final order"):
            inc = Incarnation(folder, grid_cfg(layers, alphas, samples, 5), prompts, shard, n)
            while inc.step():
                pass
        cells = {c.cell_id for c in inc.plan.cells}
        assert folder.done_cells() == cells
        df, _ = folder.merge(keep=cells)
        assert df.cell_id.is_unique and set(df.cell_id) == cells
        assert (df.completion == df.cell_id).all()  # every row is its own cell's
        # every start, whatever its own batch_size, used the batches of the first claim
        # (batch_size counts decodes: a prompt's alpha-0 cells are one baseline decode, never split)
        claimed = json.loads((folder.path / "plan.json").read_text())["batch_size"]
        decodes = [len({c.decode_key for c in b.cells}) for b in inc.plan.batches]
        assert all(n == claimed for n in decodes[:-1]), "a later start re-cut the plan"
        baselines = [(c.prompt_id, c.sample) for b in inc.plan.batches for c in b.cells if c.alpha == 0]
        assert len(set(baselines)) == sum(
            len({c.decode_key for c in b.cells if c.alpha == 0}) for b in inc.plan.batches
        )


@pytest.mark.parametrize("n", [2, 3])
def test_shard_that_starts_after_the_others_finished_gets_its_own_batches(tmp_path, n):
    """The case that lost cells: shard 0 runs to the end, only then shard 1 starts."""
    folder = RunFolder(tmp_path / "run")
    folder.create()
    prompts = [{"id": f"p{i}", "prompt": "x"} for i in range(4)]
    cfg = grid_cfg([10, 14], [0.0, 2.0], 1, 2)
    for shard in range(n):
        inc = Incarnation(folder, cfg, prompts, shard, n)
        while inc.step():
            pass
    assert len(folder.done_cells()) == 16
