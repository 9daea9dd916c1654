"""Task dispatch behind `run_experiment.py`: run, plan, status, vectors, merge, report."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from .data import DatasetError
from .generation import PromptError
from .hooks import LayerLookupError
from .loading import LoadError, max_memory, parse_hardware, plan_device_map, torch_dtype
from .plan import PlanError
from .results import ResultsError
from .validate import ConfigError, validate_model, validate_static
from .vectors import VectorError

log = logging.getLogger("steersweep")

# Errors that mean "the user asked for something impossible": one line, exit status 2.
USER_ERRORS = (
    ConfigError, DatasetError, LayerLookupError, LoadError, PlanError, PromptError, ResultsError, VectorError,
)  # fmt: skip


def plan(cfg: DictConfig) -> list:
    """Print the device map the memory budget gives on each `memory.plan_hardware` shape."""
    validate_static(cfg)
    hf = validate_model(cfg, need_checkpoint=False)
    dtype = torch_dtype(cfg.model.dtype) if cfg.model.dtype != "auto" else torch.bfloat16
    plans = []
    print(f"model {cfg.model.name}: {hf.num_hidden_layers} layers, hidden size {hf.hidden_size}, {cfg.model.dtype}")
    print(f"budget: {cfg.memory.gpu_fraction:.0%} of each GPU, CPU spill {cfg.memory.cpu}")
    from .loading import fmt_bytes
    from .runtime import cpu_budget

    # The shapes below are hypothetical; this line is what a run in this very job would get, with the
    # limit that set it (a Slurm --mem or cgroup limit the node's RAM figure does not show).
    cpu_here, cpu_why = cpu_budget(str(cfg.memory.cpu))
    print(f"CPU budget here: {fmt_bytes(cpu_here)} ({cpu_why})")
    for spec in cfg.memory.plan_hardware:
        gpus, cpu = parse_hardware(spec)
        budget = max_memory(cfg.memory, gpus)
        if cpu is not None:
            budget["cpu"] = cpu
        elif "cpu" in budget:
            budget.pop("cpu")  # stated hardware without a CPU part: GPUs only
        p = plan_device_map(hf, budget, dtype, spec, cfg.model.device_map, cfg.model.trust_remote_code)
        print(p.render())
        plans.append(p)
    return plans


def set_threads() -> None:
    """Use the CPUs Slurm gave this task, not every core of the node (oversubscribed OpenMP threads
    spin against each other: array tasks sharing a node slow down several-fold)."""
    import os

    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, int(cpus)))


def run(cfg: DictConfig) -> dict | list | Path:
    """Dispatch on `cfg.task`."""
    set_threads()
    if cfg.task == "plan":
        return plan(cfg)
    if cfg.task in ("merge", "report", "status"):
        from .plan import read_plan_doc
        from .sweep import run_folder, status

        folder = run_folder(cfg)
        if not folder.path.is_dir():
            raise ConfigError(f"run folder {folder.path} does not exist: set run_dir to a run's folder")
        if cfg.task == "status":
            return status(folder)
        if cfg.task == "merge" or not (folder.path / "results.parquet").is_file():
            doc = read_plan_doc(folder.path)
            df, path = folder.merge(csv=cfg.report.csv, keep={r[0] for r in doc["cells"]} if doc else None)
            print(f"merged {len(df)} rows into {path}")
            if cfg.task == "merge":
                return path
        from .reporting import write_report

        path = write_report([folder.path, *map(Path, cfg.report.compare_runs)], cfg.report)
        print(f"report written to {path}")
        return path
    if cfg.task == "vectors":
        from .sweep import compute_vectors_only

        return compute_vectors_only(cfg)
    from .sweep import run_sweep

    return run_sweep(cfg)
