"""Steering exact across the GPU/CPU split, bf16 agreement, and a killed bf16 sweep resumed.

A small model (SmolLM2-135M's shape, random weights) written as a checkpoint and loaded by the run's
loader: in float32, whole on the GPU vs split between the GPU and the CPU by the loader's budget,
every row must be equal. In bf16 on CUDA: the grid's rows against each cell generated alone (an
agreement rate: bf16 kernels are not batch-invariant), and a sweep through `run_experiment.py`
killed with SIGKILL after its first part and resumed, against the uninterrupted sweep, row by row.
In the dry run the split is CPU + disk (the loader's budget over the devices a CPU machine has).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .common import (
    ROOT,
    Scale,
    cli,
    free,
    gen_config,
    prompt_ids,
    random_model,
    shipped_config,
    vectors,
    write_checkpoint,
)

NAME = "smollm2_135m_instruct"


def _load(ckpt: Path, dtype: str, mem):
    from steersweep.core.config import ModelConfig
    from steersweep.model.loading import load_model

    return load_model(ModelConfig(name="small", path=str(ckpt), dtype=dtype), mem)


def _whole_and_split(ckpt: Path, scale: Scale, work: Path, f32_bytes: int, f32_layers: int) -> dict:
    import torch
    from steerbench.workload import min_new_tokens

    from steersweep.core.config import MemoryConfig
    from steersweep.generation.decode import generate_rows

    whole, tok, _ = _load(ckpt, "float32", MemoryConfig(gpu_fraction=0.9))
    near_budget = f32_bytes - f32_layers // 2  # embeddings and about half of the decoder layers
    if scale.cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        mem = MemoryConfig(gpu_fraction=near_budget / total, cpu="auto")
    else:  # no GPU: the loader's budget splits the CPU from the disk instead
        mem = MemoryConfig(cpu=f"{near_budget}B", disk_offload=True, offload_folder=str(work / "offload"))
    split, _, info = _load(ckpt, "float32", mem)
    far_devices = ("cpu", "disk") if scale.cuda else ("disk",)
    placed = sorted((int(k.split(".")[-1]), d) for k, d in split.hf_device_map.items() if ".layers." in k)
    near = [layer for layer, d in placed if d not in far_devices]
    far = [layer for layer, d in placed if d in far_devices]
    layers = [near[-1] if near else 0, far[-1] if far else whole.config.num_hidden_layers - 1]
    vec = vectors(whole.config.num_hidden_layers, whole.config.hidden_size)
    steering = [(layer, a, vec[layer]) for layer in layers for a in (0.0, 3.0)]
    ids = prompt_ids(tok, scale.split_prompts)
    rows = [p for p in ids for _ in steering]
    st = steering * len(ids)
    gen = gen_config(scale.split_tokens)
    with min_new_tokens(whole, scale.split_tokens), min_new_tokens(split, scale.split_tokens):
        ref = generate_rows(whole, tok, rows, st, gen)
        got = generate_rows(split, tok, rows, st, gen)
    equal = sum(a.token_ids == b.token_ids for a, b in zip(ref, got, strict=True))
    steered = sum(a.token_ids != b.token_ids for a, b in zip(ref[::2], ref[1::2], strict=True))
    out = {
        "rows": len(ref), "equal_rows": equal, "steering_changed_rows": steered, "steered_layers": layers,
        "layers_per_device": info["layers_per_device"], "budget": info["max_memory"],
        "tokens_per_row": scale.split_tokens,
    }  # fmt: skip
    del whole, split
    free(scale.device)
    return out


def _bf16_agreement(ckpt: Path, scale: Scale) -> dict:
    from steerbench.workload import min_new_tokens

    from steersweep.core.config import MemoryConfig
    from steersweep.generation.decode import generate_rows

    model, tok, _ = _load(ckpt, "bfloat16", MemoryConfig(gpu_fraction=0.9))
    n = model.config.num_hidden_layers
    vec = vectors(n, model.config.hidden_size)
    layers = (n // 3, n // 2)
    cells = [(p, (layer, a, vec[layer])) for p in prompt_ids(tok, scale.agree_prompts) for layer in layers
             for a in (0.0, 2.0, 4.0)]  # fmt: skip
    gen = gen_config(scale.agree_tokens)
    with min_new_tokens(model, scale.agree_tokens):
        grid = generate_rows(model, tok, [p for p, _ in cells], [s for _, s in cells], gen)
        single = [generate_rows(model, tok, [p], [s], gen)[0] for p, s in cells]
    same = sum(a.token_ids == b.token_ids for a, b in zip(grid, single, strict=True))
    del model
    free(scale.device)
    return {"cells": len(cells), "equal_to_single_cell": same, "rate": round(same / len(cells), 4),
            "tokens_per_row": scale.agree_tokens}  # fmt: skip


def _sweep_args(ckpt: Path, n_layers: int, scale: Scale, run_dir: Path) -> list[str]:
    return [
        f"model.path={ckpt}", f"model.num_hidden_layers={n_layers}", "model.dtype=bfloat16",
        f"steering.layers=[{n_layers // 3},{n_layers // 2}]", "steering.alphas=[0,2,4]", "prompts.limit=4",
        f"generation.max_new_tokens={scale.sweep_tokens}", "generation.batch_size=4", "eval.behavior_limit=4",
        "report.enabled=false", "progress=false", "memory.load_timeout_s=120", f"run_dir={run_dir}",
    ]  # fmt: skip


def _killed_and_resumed(ckpt: Path, n_layers: int, scale: Scale, work: Path, log) -> dict:
    import pandas as pd

    a, b = work / "uninterrupted", work / "resumed"
    r = cli(_sweep_args(ckpt, n_layers, scale, a), log, timeout=300)
    if r.returncode:
        raise RuntimeError(f"the uninterrupted sweep exited {r.returncode} (see the log)")
    # the first incarnation: each batch stalls 2 s, so the kill lands after the first part, mid-sweep
    env = {**os.environ, "STEERSWEEP_FAULT_STALL_BATCH": "2"}
    log.flush()
    p = subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), *_sweep_args(ckpt, n_layers, scale, b)],
                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 120:
        if any((b / "parts").glob("*.parquet")) if (b / "parts").is_dir() else False:
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    if p.poll() is None:  # no part in time: not left running beside the resumed sweep
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed = p.returncode == -signal.SIGKILL
    parts_at_kill = len(list((b / "parts").glob("*.parquet"))) if (b / "parts").is_dir() else 0
    r = cli(_sweep_args(ckpt, n_layers, scale, b), log, timeout=300)
    if r.returncode:
        raise RuntimeError(f"the resumed sweep exited {r.returncode} (see the log)")
    drop = ["seconds", "worker", "run_id"]  # when and where a row was made, and which folder it is in
    x = pd.read_parquet(a / "results.parquet").drop(columns=drop, errors="ignore")
    y = pd.read_parquet(b / "results.parquet").drop(columns=drop, errors="ignore")
    x, y = (t.sort_values("cell_id").reset_index(drop=True) for t in (x, y))
    equal, differing = 0, []
    if list(x.cell_id) == list(y.cell_id) and list(x.columns) == list(y.columns):
        xs, ys = x.map(repr), y.map(repr)  # exact floats, NaN equal to NaN, token id arrays compared whole
        equal = int((xs == ys).all(axis=1).sum())
        differing = [c for c in x.columns if not (xs[c] == ys[c]).all()]
    return {"killed_by_sigkill": killed, "parts_at_kill": parts_at_kill, "rows": len(x), "rows_resumed": len(y),
            "unique_cells_resumed": int(y.cell_id.nunique()), "equal_rows": equal, "differing_columns": differing}  # fmt: skip


def run(scale: Scale, kit: Path, work: Path, log, partial: dict) -> dict:
    import torch
    from steerbench.machine import param_counts

    cfg = shipped_config(NAME, scale)
    model = random_model(cfg, torch.bfloat16, "cpu")
    f32 = param_counts(model)[1] * 2
    f32_layers = sum(p.numel() * 4 for p in model.model.layers.parameters())
    ckpt, _, _ = write_checkpoint(model, kit, work / "small")
    del model
    out = partial
    out.update(model=NAME, weights_float32_bytes=f32)
    out["split"] = _whole_and_split(ckpt, scale, work, f32, f32_layers)
    out["bf16_agreement"] = _bf16_agreement(ckpt, scale)
    out["bf16_resume"] = _killed_and_resumed(ckpt, cfg.num_hidden_layers, scale, work, log)
    return out
