"""Fault points for the fault-injection tests. Unset in normal runs: no cost.

- `STEERSWEEP_FAULT_STALL_<NAME>=seconds` sleeps at point NAME.
- `STEERSWEEP_FAULT_OOM_<NAME>=n` raises an out-of-memory error the first n times point NAME is
  passed in this process (exercises the back-off without needing a GPU that runs out).
- `STEERSWEEP_FAULT_RANK=r` limits every fault to the process whose `RANK` (torchrun) is r.

Points: LOAD (inside the load watchdog), BATCH (inside the per-batch watchdog, before a generate
call), WRITE (after a part's temporary file is written, before it is renamed into place).
"""

from __future__ import annotations

import os
import time
from collections import Counter

import torch

_raised: Counter = Counter()


def fault_point(name: str) -> None:
    key = name.upper()
    rank = os.environ.get("STEERSWEEP_FAULT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    delay = os.environ.get(f"STEERSWEEP_FAULT_STALL_{key}")
    if delay:
        time.sleep(float(delay))
    ooms = int(os.environ.get(f"STEERSWEEP_FAULT_OOM_{key}", "0") or 0)
    if _raised[key] < ooms:
        _raised[key] += 1
        # what PyTorch raises (type and message), so the back-off sees exactly what a real one shows
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at fault point {key}, {_raised[key]} of {ooms})"
        )
