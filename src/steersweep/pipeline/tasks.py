"""Task dispatch behind `run_experiment.py`: run, plan, status, vectors, merge, report."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from steersweep.core.errors import ConfigError
from steersweep.model.dtypes import torch_dtype
from steersweep.model.placement import max_memory, parse_hardware, plan_device_map
from steersweep.pipeline.validate import validate_model, validate_static
from steersweep.runs.grid import Grid, expand

log = logging.getLogger("steersweep")


def grid_line(grid: Grid, num_layers: int, prompts: list[dict]) -> str:
    """The sweep's grid in words: each axis with more than one value, and the cells the plan makes."""
    sets = grid.layer_sets(num_layers)
    axes = [
        (len(prompts), "prompts"),
        (len(grid.concepts), "concepts"),
        (len(grid.methods), "methods"),
        (len(grid.modes), "modes"),
        (len(sets), "layers" if all(len(ls) == 1 and label != "all" for label, ls in sets) else "layer sets"),
        (len(grid.alphas), "alphas"),
        (grid.samples, "samples"),
    ]
    shown = [f"{n} {name}" for n, name in axes if n != 1 or name in ("prompts", "layers", "layer sets", "alphas")]
    return f"grid: {' x '.join(shown)} = {len(expand(grid, prompts, '', num_layers))} cells"


def plan(cfg: DictConfig) -> tuple[list, list[str]]:
    """Per `memory.plan_hardware` shape, the device map the budget gives (`Placement`s), and in words (the
    lines `task=plan` prints): each device's headroom after its weights and the rows of the sweep's
    length that headroom holds."""
    validate_static(cfg)
    hf = validate_model(cfg, need_checkpoint=False)
    dtype = torch_dtype(cfg.model.dtype) if cfg.model.dtype != "auto" else torch.bfloat16
    plans, said = [], []
    quant = cfg.model.quantization
    said.append(
        f"model {cfg.model.name}: {hf.num_hidden_layers} layers, hidden size {hf.hidden_size}, {cfg.model.dtype}"
        + (f", {quant} quantized (bitsandbytes)" if quant else "")
    )
    said.append(f"budget: {cfg.memory.gpu_fraction:.0%} of each GPU, CPU spill {cfg.memory.cpu}")
    from steersweep.inputs import datasets as data

    prompts = data.load_prompts(cfg.prompts.dataset, cfg.prompts.limit)  # read once: the grid and the lengths
    grid = Grid.of(cfg)
    said.append(grid_line(grid, hf.num_hidden_layers, prompts))
    said.append(f"  {grid.origin}")
    from steersweep.core.runtime import cpu_budget
    from steersweep.core.units import fmt_bytes

    # The shapes below are hypothetical; this line is what a run in this very job would get, with the
    # limit that set it (a Slurm --mem or cgroup limit the node's RAM figure does not show).
    cpu_here, cpu_why = cpu_budget(str(cfg.memory.cpu))
    said.append(f"CPU budget here: {fmt_bytes(cpu_here)} ({cpu_why})")
    prompt_len, how = prompt_tokens(cfg, [p["prompt"] for p in prompts])
    seq_len = prompt_len + int(cfg.generation.max_new_tokens)
    said.append(
        f"rows sized for {seq_len} tokens: longest prompt {prompt_len} ({how}) + max_new_tokens "
        f"{cfg.generation.max_new_tokens}; headroom = device memory - weights, 90% of it for rows"
    )
    for spec in cfg.memory.plan_hardware:
        gpus, cpu = parse_hardware(spec)
        budget = max_memory(cfg.memory, gpus)
        if cpu is not None:
            budget["cpu"] = cpu
        elif "cpu" in budget:
            budget.pop("cpu")  # stated hardware without a CPU part: GPUs only
        totals = {**dict(enumerate(gpus)), **({"cpu": budget["cpu"]} if "cpu" in budget else {})}
        p = plan_device_map(
            hf, budget, dtype, spec, cfg.model.device_map, cfg.model.trust_remote_code, quant, seq_len, totals
        )
        said.append(p.render())
        if "disk" in p.bytes_per_device and not cfg.memory.disk_offload:
            said.append("  does NOT load as configured: weights left over for disk, and memory.disk_offload=false")
        weights = sum(p.bytes_per_device.values())
        if len(gpus) > 1 and weights <= budget.get(0, 0):
            said.append(
                f"  a replica ({fmt_bytes(weights)}) fits on one GPU: {len(gpus)} at once, one process per GPU: "
                f"sbatch --ntasks-per-node={len(gpus)} slurm/submit_per_gpu.sh model={cfg.model.name}"
            )
        plans.append(p)
    return plans, said


def prompt_tokens(cfg: DictConfig, texts: list[str]) -> tuple[int, str]:
    """Tokens of the longest prompt as the run encodes it (the checkpoint's tokenizer when it is on
    this machine), else an estimate of 1 token per 3 characters plus 64 for a chat template."""
    from pathlib import Path as P

    from steersweep.model.checkpoint import resolve_model_path

    path = cfg.model.path
    if path is None:
        from steersweep.model.embedded import DEFAULT_MODEL_DIR, STAMP

        path = str(DEFAULT_MODEL_DIR) if (DEFAULT_MODEL_DIR / STAMP).exists() else None
    if path and P(path).expanduser().is_dir():
        try:
            from transformers import AutoTokenizer

            from steersweep.inputs.encoding import encode_prompts

            tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model) if cfg.model.path is None else path)
            return max(len(ids) for ids in encode_prompts(tok, texts, cfg.generation)), "its tokenizer"
        except Exception as e:  # no usable tokenizer here: estimate instead
            log.debug("estimating prompt lengths: cannot read the tokenizer in %s (%s)", path, e)
    return max(len(t) for t in texts) // 3 + 64, "estimate: characters / 3 + 64"


def set_threads() -> None:
    """Use the CPUs Slurm gave this task, not every core of the node (oversubscribed OpenMP threads
    spin against each other: array tasks sharing a node slow down several-fold)."""
    import os

    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, int(cpus)))


@dataclass
class Outcome:
    """What a task made (`value`: the run's summary, the plans, the report's page...) and the lines the
    CLI prints about it (`said`)."""

    value: Any
    said: list[str] = field(default_factory=list)


def run(cfg: DictConfig) -> Outcome:
    """Dispatch on `cfg.task`."""
    set_threads()
    if cfg.task == "plan":
        return Outcome(*plan(cfg))
    if cfg.task in ("merge", "report", "status"):
        from steersweep.pipeline.finish import status
        from steersweep.pipeline.sweep import run_folder
        from steersweep.runs.planfile import read_plan_doc

        folder = run_folder(cfg)
        if not folder.path.is_dir():
            raise ConfigError(f"run folder {folder.path} does not exist: set run_dir to a run's folder")
        if cfg.task == "status":
            counts = status(folder)
            return Outcome(counts, counts.pop("said"))
        said = []
        if cfg.task == "merge" or not folder.results_path.is_file():
            doc = read_plan_doc(folder.path)
            df, path = folder.merge(csv=cfg.report.csv, keep={r[0] for r in doc["cells"]} if doc else None)
            said.append(f"merged {len(df)} rows into {path}")
            if cfg.task == "merge":
                return Outcome(path, said)
        from steersweep.reporting.write import PAGE, write_report

        summary = write_report([folder.path, *map(Path, cfg.report.compare_runs)], cfg.report)
        page = summary.with_name(PAGE)  # the front page: summary, tables, plots, completions browser
        said.append(f"report written to {page}")
        return Outcome(page, said)
    if cfg.task == "vectors":
        from steersweep.pipeline.sweep import compute_vectors_only

        made = compute_vectors_only(cfg)
        return Outcome(made, made.pop("said"))
    from steersweep.pipeline.sweep import run_sweep

    summary = run_sweep(cfg)
    return Outcome(summary, summary.pop("said", []))
