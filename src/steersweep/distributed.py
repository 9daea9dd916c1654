"""Data parallelism inside a node: one model replica per process (field report 01's pattern).

Rank 0 prepares (validates, claims the run folder's plan) and broadcasts the result
(`broadcast_object_list`), errors included, so no rank waits on a broadcast that never comes.
Each rank is then one more worker of the plan: it takes its own planned batches and writes its own
part files (atomic, like any shard's). There is no collective per batch, so nothing a rank decides
alone (an out-of-memory back-off, a batch that fails) can make the ranks join different numbers of
collectives. They meet once more at the end (`gather_object([status])`): a rank that failed makes
every rank exit with its error. Start it with
`torchrun --nproc_per_node N run_experiment.py data_parallel=true ...`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch


class RankError(RuntimeError):
    """Another data-parallel rank failed."""


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

    def call_on_main(self, fn: Callable[[], object]):
        """Run `fn` on rank 0 and give every rank its result, or raise its error on every rank."""
        out = None
        if self.is_main:
            try:
                out = ("ok", fn())
            except Exception as e:  # the other ranks must learn of it, not wait in the broadcast
                out = ("error", e)
        out = self.broadcast(out)
        if out[0] == "error":
            raise out[1]
        return out[1]

    def gather(self, obj) -> list:
        """One object per rank, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])  # a list: a dict would be flattened into its keys

    def raise_any(self, error: BaseException | None) -> None:
        """Every rank calls this once at the end: if any rank failed, all raise its error."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        errors = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            r, e = failed[0]
            raise RankError(f"data-parallel rank {r} failed ({e}); rerun the same command to resume")
