"""Data parallelism inside a node: one model replica per process (field report 01's pattern).

Rank 0 prepares (validates, claims the run folder's plan) and broadcasts the result
(`broadcast_object_list`), errors included, so no rank waits on a broadcast that never comes.
Each rank is then one more worker of the plan: it takes its own planned batches and writes its own
part files (atomic, like any shard's). There is no collective per batch, so nothing a rank decides
alone (an out-of-memory back-off, a batch that fails) can make the ranks join different numbers of
collectives. They meet once more at the end (`gather_object([status])`): a rank that failed makes
every rank exit with its error. Start it with
`torchrun --nproc_per_node N run_experiment.py data_parallel=true ...`.

Under Slurm, `srun --ntasks-per-node=G --gpus-per-task=1 ... data_parallel=true` (slurm/submit_per_gpu.sh)
starts G tasks, each bound to one GPU, without torchrun: each task is an *independent* worker of the
plan (rank SLURM_PROCID of SLURM_NTASKS), with no process group at all. It claims or joins the plan
itself (the claim is atomic), writes its own part files, and merges the table if it finishes
last, exactly like a shard of an array; a task that fails leaves its batches to a rerun.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from steersweep.core.errors import RankError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_gpu: int | None = None
    state: object = None
    independent: bool = False  # Slurm tasks without a process group: each rank acts on its own

    @property
    def is_main(self) -> bool:
        """Rank 0; every rank when the ranks are independent (each prepares, and merges if last)."""
        return self.rank == 0 or self.independent

    @classmethod
    def of(cls, data_parallel: bool, environ: dict[str, str] | None = None) -> Dist:
        """The ranks of this job: one process unless `data_parallel` and a launcher (torchrun,
        accelerate, srun with several tasks) started several."""
        env = os.environ if environ is None else environ
        if not data_parallel:
            return cls()
        if "WORLD_SIZE" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
            return cls.slurm_tasks(env)
        if int(env.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        # Plain PartialState() on a CPU-only box silently runs single-process: ask for gloo.
        state = PartialState(cpu=not torch.cuda.is_available())
        gpu = state.local_process_index if torch.cuda.is_available() else None
        return cls(state.process_index, state.num_processes, gpu, state)

    @classmethod
    def slurm_tasks(cls, env) -> Dist:
        """One independent worker per Slurm task (srun --ntasks-per-node=G --gpus-per-task=1).

        A task bound to one GPU sees only that GPU (CUDA_VISIBLE_DEVICES): it is device 0. Tasks that
        share the node's GPUs take the one matching their local task id.
        """
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        gpu = None
        if torch.cuda.is_available():
            gpu = 0 if torch.cuda.device_count() == 1 else int(env.get("SLURM_LOCALID", "0"))
        return cls(rank, world, gpu, None, independent=True)

    def broadcast(self, obj):
        if self.world == 1 or self.independent:
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
        """One object per rank, in rank order, on every rank (independent ranks: their own only)."""
        if self.world == 1 or self.independent:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])  # a list: a dict would be flattened into its keys

    def raise_any(self, error: BaseException | None) -> None:
        """Every rank calls this once at the end: if any rank failed, all raise its error."""
        if self.world == 1 or self.independent:
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
