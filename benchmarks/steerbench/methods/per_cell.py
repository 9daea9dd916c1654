"""(b) One cell per call: `generate_rows` with a batch of one row (KV cache, steering hook)."""

from __future__ import annotations

import torch

from ..workload import Method, Workload
from . import run_rows


def run(model, tok, w: Workload, device: torch.device, only: list[int] | None = None) -> Method:
    """Every cell, or the cells `only`."""
    groups = [[i] for i in (range(len(w.cells)) if only is None else only)]
    return run_rows("per_cell", "steersweep.generation.generate_rows, 1 row per call", model, tok, w, groups, device)
