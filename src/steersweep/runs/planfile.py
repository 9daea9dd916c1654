"""plan.json: the run's cells and batches written once, claimed by the first worker, read by the rest."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from steersweep.core.errors import PlanError
from steersweep.core.fileio import claim
from steersweep.runs.grid import Batch, Cell, Grid, batch_cells, cut
from steersweep.runs.identity import check_identity
from steersweep.runs.launch import launch_command

PLAN_FILE = "plan.json"
PLAN_FORMAT = "steersweep.plan.v2"  # v2: batches listed (a baseline is one decode)


@dataclass
class RunPlan:
    """The claimed plan of a run folder."""

    folder: Path
    identity: dict
    identity_hash: str
    batch_size: int
    batches: list[Batch]
    command: list[str]

    @property
    def cells(self) -> list[Cell]:
        return [c for b in self.batches for c in b.cells]


def _plan_doc(ident: dict, ident_hash: str, size: int, cells: list[Cell], command: list[str]) -> dict:
    batches = cut(cells, size)
    return {
        "format": PLAN_FORMAT,
        "identity_hash": ident_hash,
        "identity": ident,
        "batch_size": size,  # decodes per batch: a prompt's alpha-0 cells are one decode
        "n_cells": len(cells),
        "n_batches": len(batches),
        "batch_cells": [len(b.cells) for b in batches],  # batch b = the next batch_cells[b] cells in order
        "cells": [  # in batch order (the canonical order, a baseline's cells side by side)
            [c.cell_id, c.layer, c.alpha, c.prompt_id, c.sample, c.label, c.method, c.mode, c.concept]
            for b in batches
            for c in b.cells
        ],
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_plan_doc(folder: Path) -> dict | None:
    p = Path(folder) / PLAN_FILE
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{p} is unreadable ({e}): move the folder aside or choose another run_dir") from None
    if doc.get("format") == "steersweep.plan.v1":
        raise PlanError(
            f"{p} is an older plan (each layer decoded its own alpha-0 baseline; sampled baselines were "
            "seeded per layer): its rows would not match this version's, so choose another run_dir"
        )
    if doc.get("format") != PLAN_FORMAT:
        raise PlanError(f"{p} was written by another steersweep version: choose another run_dir")
    return doc


def claim_plan(grid: Grid, folder: Path, cells: list[Cell], ident: dict, ident_hash: str) -> RunPlan:
    """Claim the folder for this identity and plan, or join the plan already claimed there.

    The first job writes plan.json atomically (exclusive create); every later job (a resume, a
    requeue, another shard, a concurrent twin) must have the same identity, and then uses the
    folder's batch size and order whatever its own `generation.batch_size` says, so work is never
    re-dealt. Raises PlanError naming the differing keys otherwise.
    """
    folder = Path(folder)
    size = grid.batch_size
    doc = read_plan_doc(folder)
    if doc is None:
        if (folder / "manifest.json").exists():
            raise PlanError(
                f"run folder {folder} was made by an older steersweep (no {PLAN_FILE}): choose another run_dir"
            )
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_plan_doc(ident, ident_hash, size, cells, launch_command()), indent=1, default=str)
        if not claim(folder / PLAN_FILE, text):  # a concurrent job claimed it first: join or refuse
            doc = read_plan_doc(folder)
    if doc is None:
        doc = json.loads((folder / PLAN_FILE).read_text())
    check_identity(doc, ident, ident_hash, folder)
    by_id = {c.cell_id: c for c in cells}
    order = [row[0] for row in doc["cells"]]
    if set(order) != set(by_id) or len(order) != len(by_id):
        raise PlanError(f"{folder / PLAN_FILE} lists other cells than this config makes: choose another run_dir")
    size = int(doc["batch_size"])
    if grid.batch_size != size and grid.batch_size_asked:
        import logging

        logging.getLogger(__name__).info(
            "using the folder's planned batch size %d (this command asked for %d): work is never re-dealt",
            size, grid.batch_size,
        )  # fmt: skip
    batches = [Batch(b, tuple(by_id[i] for i in ids)) for b, ids in enumerate(batch_cells(doc))]
    return RunPlan(folder, ident, ident_hash, size, batches, list(doc.get("command") or []))
