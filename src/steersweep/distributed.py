"""Data parallelism inside a node: one model replica per process (field report 01's pattern).

Rank 0 prepares the work list and broadcasts it (`broadcast_object_list`); each rank takes
`cells[rank::world]`; rows come back to rank 0 with `gather_object([rows])` (a list: a dict would
be flattened into its keys) and only rank 0 writes. No DDP and no autograd: inference only.
Start it with `torchrun --nproc_per_node N run_experiment.py data_parallel=true ...`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_gpu: int | None = None
    state: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_cfg(cls, cfg) -> Dist:
        if not cfg.data_parallel or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        # Plain PartialState() on a CPU-only box silently runs single-process: ask for gloo.
        state = PartialState(cpu=not torch.cuda.is_available())
        gpu = state.local_process_index if torch.cuda.is_available() else None
        return cls(state.process_index, state.num_processes, gpu, state)

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj if self.is_main else None]
        broadcast_object_list(box, from_process=0)  # fills the list in place
        return box[0]

    def gather(self, rows: list[dict]) -> list[dict]:
        """All ranks' rows, on every rank (only rank 0 uses them)."""
        if self.world == 1:
            return rows
        from accelerate.utils import gather_object

        parts = gather_object([rows])  # one list per rank
        return [r for part in parts for r in part]

    def max_int(self, x: int) -> int:
        if self.world == 1:
            return x
        return max(self.gather([{"x": x}]), key=lambda d: d["x"])["x"]
