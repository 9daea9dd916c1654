"""The grid under static batching: `generate_rows(engine="generate")`, i.e. one HF `generate` call.

Every row of the batch is decoded until the longest row ends (or max_new_tokens), finished rows
included: the baseline the EOS-heavy workload measures the decode loop's compaction against.
"""

from __future__ import annotations

import torch

from ..workload import Method, Workload
from . import grid


def run(model, tok, w: Workload, batch: int, device: torch.device) -> Method:
    return grid.run(model, tok, w, batch, device, engine="generate", name="static")
