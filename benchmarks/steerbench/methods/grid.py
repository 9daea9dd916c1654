"""(d) Ours: `generate_rows` with every cell a row of one call (or `--batch` rows per call).

Each row is steered by its own (layer, alpha, vector). `engine` picks generate_rows' decode loop
("loop": rows that hit EOS leave the batch) or HF `generate` ("generate": static batching).
"""

from __future__ import annotations

import torch

from ..workload import Method, Workload
from . import run_rows


def run(
    model, tok, w: Workload, batch: int, device: torch.device, engine: str | None = None, name: str = "grid"
) -> Method:
    groups = w.batches(batch)
    impl = f"steersweep.generation.generate_rows, {len(groups[0])} rows per call" + (
        f", engine={engine}" if engine else ""
    )
    return run_rows(name, impl, model, tok, w, groups, device, engine)
