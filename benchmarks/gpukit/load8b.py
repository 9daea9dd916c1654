"""Field reports 03 and 04 at 8B: a sharded checkpoint on disk, loaded with a third of the layers spilled.

A Llama-3-8B-shaped checkpoint (random bf16 weights, the kit's tokenizer) is written as sharded
safetensors on the node's disk and loaded by the run's own loader (`steersweep.model.loading.
load_model`: `device_map="auto"`, a `max_memory` whose GPU share holds about two thirds of the
decoder layers, never `offload_state_dict`, under the load watchdog). Then a real sweep through
`run_experiment.py` on the same checkpoint with the same budget (a small grid, Parquet written,
report off): load seconds, decoder layers per device, rows written.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .common import Scale, cli, free, random_model, shipped_config, write_checkpoint

NAME = "llama3_8b_instruct"


def _fraction(weights: int, scale: Scale) -> float:
    """memory.gpu_fraction that holds about two thirds of the weights on GPU 0 (the rest spills)."""
    if not scale.cuda:
        return 0.9
    return (2 * weights / 3) / torch.cuda.get_device_properties(0).total_memory


def run(scale: Scale, kit: Path, work: Path, log, partial: dict) -> dict:
    import pandas as pd
    from steerbench.machine import param_counts

    from steersweep.core.config import MemoryConfig, ModelConfig
    from steersweep.model.loading import load_model

    cfg = shipped_config(NAME, scale)
    model = random_model(cfg, torch.bfloat16, scale.device)
    weights = param_counts(model)[1]
    ckpt, write_s, on_disk = write_checkpoint(model, kit, work / "llama8b")
    partial.update(model=NAME, weight_bytes=weights, checkpoint_bytes=on_disk, checkpoint_write_seconds=write_s)
    del model
    free(scale.device)
    fraction = _fraction(weights, scale)
    mem = MemoryConfig(gpu_fraction=fraction, cpu="auto", load_timeout_s=240)
    model, _, info = load_model(ModelConfig(name="llama8b", path=str(ckpt), dtype="bfloat16"), mem)
    layers = info["layers_per_device"]
    partial.update(load_seconds=info["load_seconds"], layers_per_device=layers, gpu_fraction=fraction)
    del model
    free(scale.device)
    n = cfg.num_hidden_layers
    run_dir = work / "sweep"
    args = [
        "model=llama8b", f"model.path={ckpt}", f"model.num_hidden_layers={n}", f"memory.gpu_fraction={fraction:.6f}",
        "memory.load_timeout_s=240", "memory.batch_timeout_s=240", f"steering.layers=[{n // 4},{n // 2}]",
        "steering.alphas=[0,4]", "prompts.limit=2", f"generation.max_new_tokens={scale.sweep_tokens}",
        "eval.behavior_limit=4", "report.enabled=false", "progress=false", f"run_dir={run_dir}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    r = cli(args, log, timeout=400)
    sweep_s = time.perf_counter() - t0
    rows = len(pd.read_parquet(run_dir / "results.parquet")) if (run_dir / "results.parquet").is_file() else 0
    return {
        "model": NAME, "weight_bytes": weights, "checkpoint_bytes": on_disk, "checkpoint_write_seconds": write_s,
        "shards": len(list(ckpt.glob("*.safetensors"))), "gpu_fraction": fraction,
        "load_seconds": info["load_seconds"], "layers_per_device": layers, "budget": info["max_memory"],
        "offload_state_dict": False, "sweep_exit_code": r.returncode, "sweep_seconds": round(sweep_s, 2),
        "rows_written": rows, "rows_expected": 2 * 2 * 2,
    }  # fmt: skip
