"""Who runs what: a Slurm array task's shard, worker names, and the commands that resume or finish a
run."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from omegaconf import DictConfig

from steersweep.core.errors import ConfigError
from steersweep.core.paths import source_checkout

# ---------------------------------------------------------------------------------------------
# Shards


def shard_of(cfg: DictConfig, multirun: bool | None = None) -> tuple[int, int]:
    """This job's (index, count) of shards. Sharding is explicit: nothing is read from the
    environment unless `shard_count=auto`, which takes the Slurm array task (the sbatch script's
    choice). A job started by a Hydra multirun (one Slurm array for all its jobs) never shards.
    """
    if cfg.shard_count is None:
        return 0, 1
    if str(cfg.shard_count) != "auto":
        return int(cfg.shard_index or 0), int(cfg.shard_count)
    if multirun if multirun is not None else _in_multirun():
        raise ConfigError(
            "shard_count=auto in a -m sweep would split every job's grid across the sweep's array: "
            "drop it, or sweep shards explicitly (-m shard_count=2 shard_index=0,1)"
        )
    raw = {k: os.environ.get(k) for k in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN")}
    if raw["SLURM_ARRAY_TASK_COUNT"] is None:
        return 0, 1  # not an array job: one shard
    try:
        n, i = int(raw["SLURM_ARRAY_TASK_COUNT"] or ""), int(raw["SLURM_ARRAY_TASK_ID"] or "")
        first = int(raw["SLURM_ARRAY_TASK_MIN"] or 0)
    except ValueError:
        shown = " ".join(f"{k}={v}" for k, v in raw.items() if v is not None)
        raise ConfigError(
            f"Slurm array environment is not integers ({shown}): unset it or set shard_index and shard_count"
        ) from None
    if not (n >= 1 and 0 <= i - first < n):
        raise ConfigError(
            f"Slurm array task {i} (min {first}) is not in a contiguous array of {n} tasks: "
            f"submit --array=0-{max(n, 1) - 1}, or set shard_index and shard_count"
        )
    return i - first, n


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def worker_name(shard: tuple[int, int], rank: int = 0, world: int = 1) -> str:
    return f"s{shard[0]}of{shard[1]}" + (f"r{rank}" if world > 1 else "")


def launch_command() -> list[str]:
    """The overrides of the running Hydra job (for `task=status` to say how to finish)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def run_dir_arg(folder: Path) -> str:
    """`run_dir=<folder>` as one shell word: Hydra's quoting for odd characters, then the shell's."""
    path = str(folder)
    if not re.fullmatch(r"[\w./-]+", path):  # Hydra's grammar: quote, then the shell's quoting on top
        path = '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return shlex.quote(f"run_dir={path}")


def cli_command() -> str:
    """The command to suggest: `python run_experiment.py` from a source checkout (its documented
    entry, run from the checkout's root), else `steersweep` (the console script an install gives)."""
    return "python run_experiment.py" if source_checkout() is not None else "steersweep"


def finish_command(command: list[str], folder: Path) -> str:
    keep = [a for a in command if a.split("=")[0].lstrip("+~") not in ("shard_index", "shard_count", "run_dir", "task")]
    return " ".join([cli_command(), *map(shlex.quote, keep), run_dir_arg(folder)])
