"""Fault points for the fault-injection tests: `STEERSWEEP_FAULT_STALL_<NAME>=seconds` sleeps there.

Points: LOAD (inside the load watchdog), BATCH (inside the per-batch watchdog), WRITE (after a part's
temporary file is written, before it is renamed into place). Unset in normal runs: no cost.
"""

from __future__ import annotations

import os
import time


def fault_point(name: str) -> None:
    delay = os.environ.get(f"STEERSWEEP_FAULT_STALL_{name.upper()}")
    if delay:
        time.sleep(float(delay))
