"""Task dispatch behind `run_experiment.py`: run, plan, status, vectors, merge, report."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from steersweep.core.errors import ConfigError
from steersweep.model.dtypes import torch_dtype
from steersweep.model.placement import max_memory, parse_hardware, plan_device_map
from steersweep.pipeline.validate import validate_model, validate_static
from steersweep.runs.grid import grid_origin

log = logging.getLogger("steersweep")


def grid_line(cfg: DictConfig, num_layers: int, prompts: list[dict]) -> str:
    """The sweep's grid in words: each axis with more than one value, and the cells the plan makes."""
    from steersweep.runs.grid import as_list, concepts, expand, layer_sets

    sets = layer_sets(cfg.steering.layers, num_layers)
    axes = [
        (len(prompts), "prompts"),
        (len(concepts(cfg)), "concepts"),
        (len(as_list(cfg.vectors.method)), "methods"),
        (len(as_list(cfg.steering.mode)), "modes"),
        (len(sets), "layers" if all(len(ls) == 1 and label != "all" for label, ls in sets) else "layer sets"),
        (len(cfg.steering.alphas), "alphas"),
        (int(cfg.steering.samples), "samples"),
    ]
    shown = [f"{n} {name}" for n, name in axes if n != 1 or name in ("prompts", "layers", "layer sets", "alphas")]
    return f"grid: {' x '.join(shown)} = {len(expand(cfg, prompts, '', num_layers))} cells"


def plan(cfg: DictConfig) -> list:
    """Print, per `memory.plan_hardware` shape, the device map the budget gives, each device's
    headroom after its weights, and the rows of the sweep's length that headroom holds."""
    validate_static(cfg)
    hf = validate_model(cfg, need_checkpoint=False)
    dtype = torch_dtype(cfg.model.dtype) if cfg.model.dtype != "auto" else torch.bfloat16
    plans = []
    quant = cfg.model.quantization
    print(
        f"model {cfg.model.name}: {hf.num_hidden_layers} layers, hidden size {hf.hidden_size}, {cfg.model.dtype}"
        + (f", {quant} quantized (bitsandbytes)" if quant else "")
    )
    print(f"budget: {cfg.memory.gpu_fraction:.0%} of each GPU, CPU spill {cfg.memory.cpu}")
    from steersweep.inputs import datasets as data

    prompts = data.load_prompts(cfg.prompts.dataset, cfg.prompts.limit)  # read once: the grid and the lengths
    print(grid_line(cfg, hf.num_hidden_layers, prompts))
    print(f"  {grid_origin(cfg)}")
    from steersweep.core.runtime import cpu_budget
    from steersweep.core.units import fmt_bytes

    # The shapes below are hypothetical; this line is what a run in this very job would get, with the
    # limit that set it (a Slurm --mem or cgroup limit the node's RAM figure does not show).
    cpu_here, cpu_why = cpu_budget(str(cfg.memory.cpu))
    print(f"CPU budget here: {fmt_bytes(cpu_here)} ({cpu_why})")
    prompt_len, how = prompt_tokens(cfg, [p["prompt"] for p in prompts])
    seq_len = prompt_len + int(cfg.generation.max_new_tokens)
    print(
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
        print(p.render())
        if "disk" in p.bytes_per_device and not cfg.memory.disk_offload:
            print("  does NOT load as configured: weights left over for disk, and memory.disk_offload=false")
        weights = sum(p.bytes_per_device.values())
        if len(gpus) > 1 and weights <= budget.get(0, 0):
            print(
                f"  a replica ({fmt_bytes(weights)}) fits on one GPU: {len(gpus)} at once, one process per GPU: "
                f"sbatch --ntasks-per-node={len(gpus)} slurm/submit_per_gpu.sh model={cfg.model.name}"
            )
        plans.append(p)
    return plans


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


def run(cfg: DictConfig) -> dict | list | Path:
    """Dispatch on `cfg.task`."""
    set_threads()
    if cfg.task == "plan":
        return plan(cfg)
    if cfg.task in ("merge", "report", "status"):
        from steersweep.pipeline.finish import status
        from steersweep.pipeline.sweep import run_folder
        from steersweep.runs.planfile import read_plan_doc

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
        from steersweep.reporting.write import PAGE, write_report

        summary = write_report([folder.path, *map(Path, cfg.report.compare_runs)], cfg.report)
        page = summary.with_name(PAGE)  # the front page: summary, tables, plots, completions browser
        print(f"report written to {page}")
        return page
    if cfg.task == "vectors":
        from steersweep.pipeline.vectorstage import compute_vectors_only

        return compute_vectors_only(cfg)
    from steersweep.pipeline.sweep import run_sweep

    return run_sweep(cfg)
