"""Llama-3-70B on one GPU as the field reports run it: 90% of the GPU, the rest spilled to the CPU.

The shipped config in bf16 (about 131 GiB of weights) is placed by the run's planner
(`steersweep.model.placement.plan_device_map` on the budget `max_memory` gives for this machine, as
`task=plan` does). No checkpoint that size fits on the node's disk, so the weights are made random
directly on the devices the planner chose and the model is dispatched with accelerate's
`dispatch_model` (the placement and CPU-offload hooks `from_pretrained` installs). Then steered grids
of 1 to 256 rows of distinct (layer, alpha), EOS masked: tok/s, seconds per decoding step, bytes per
device, and peak GPU memory against the plan's prediction (weights on the GPU + the largest spilled
module, copied in for its forward + rows x the rows estimate per row).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .common import Scale, free, gen_config, prompt_ids, shipped_config, tokenizer, vectors

NAME = "llama3_70b_instruct"


def _device_of(dev) -> str:
    return f"cuda:{dev}" if str(dev).isdigit() else "cpu"


def materialise(config, device_map: dict, main: str):
    """Random bf16 weights made on each module's planned device, then accelerate's dispatch."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    from steersweep.model.memory import placed_on

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    torch.manual_seed(0)
    for name, p in list(model.named_parameters()):
        dev = _device_of(placed_on(device_map, name))
        value = torch.empty(p.shape, dtype=torch.bfloat16, device=dev)
        value.fill_(1.0) if name.endswith("norm.weight") else value.normal_(0.0, 0.02)
        set_module_tensor_to_device(model, name, dev, value=value)
    if main == "cpu":
        return model
    return dispatch_model(model, device_map=device_map, main_device=0)  # accelerate's main device: GPU 0


def run(scale: Scale, kit: Path, work: Path, log, partial: dict) -> dict:
    from steerbench.machine import sync
    from steerbench.workload import min_new_tokens

    from steersweep.core.config import MemoryConfig
    from steersweep.generation.decode import generate_rows
    from steersweep.model.memory import execution_shares, module_names, row_bytes_on
    from steersweep.model.placement import max_memory, plan_device_map

    cfg = shipped_config(NAME, scale)
    tok = tokenizer(kit)
    ids = prompt_ids(tok, max(scale.spill_rows))
    seq = max(len(p) for p in ids) + scale.spill_tokens
    budget = max_memory(MemoryConfig(gpu_fraction=0.9, cpu="auto"))
    totals = {k: (torch.cuda.get_device_properties(k).total_memory if k != "cpu" else v) for k, v in budget.items()}
    hardware = f"{len(totals) - ('cpu' in totals)} GPU(s) + CPU" if scale.cuda else "CPU"
    plan = plan_device_map(cfg, budget, torch.bfloat16, hardware=hardware, seq_len=seq, totals=totals)
    main = "cuda:0" if scale.cuda else "cpu"
    device = torch.device(main)
    partial["plan"] = {"render": plan.render(), "bytes_per_device": plan.bytes_per_device}
    t0 = time.perf_counter()
    model = materialise(cfg, plan.device_map, main)
    sync(device)
    partial["materialise_seconds"] = round(time.perf_counter() - t0, 2)
    gpu_after_load = torch.cuda.memory_allocated(0) if scale.cuda else 0
    layer_names, head = module_names(model)
    shares = execution_shares(plan.device_map, layer_names, head)
    per_row = row_bytes_on(cfg, shares[main], seq)
    spilled = [n for n, d in plan.device_map.items() if d in ("cpu", "disk")] if scale.cuda else []
    largest_spilled = max((_module_bytes(model, n) for n in spilled), default=0)
    n = cfg.num_hidden_layers
    vec = vectors(n, cfg.hidden_size)
    layers = [round(n * f) for f in (0.25, 0.33, 0.4, 0.5, 0.6)]
    grids = partial.setdefault("grids", [])
    with min_new_tokens(model, scale.spill_tokens):
        generate_rows(model, tok, ids[:1], [(layers[0], 1.0, vec[layers[0]])], gen_config(2))  # warm-up
        for rows in scale.spill_rows:
            steering = [(layers[i % len(layers)], 1.0 + i / 64, vec[layers[i % len(layers)]]) for i in range(rows)]
            if scale.cuda:
                sync(device)
                torch.cuda.reset_peak_memory_stats(0)
            t0 = time.perf_counter()
            outs = generate_rows(model, tok, ids[:rows], steering, gen_config(scale.spill_tokens))
            sync(device)
            s = time.perf_counter() - t0
            tokens = sum(o.n_new_tokens for o in outs)
            peak = torch.cuda.max_memory_allocated(0) if scale.cuda else None
            predicted = plan.bytes_per_device.get("0", 0) + largest_spilled + rows * per_row
            grids.append({
                "rows": rows, "tokens": tokens, "seconds": s, "tok_per_s": tokens / s,
                "seconds_per_step": s / scale.spill_tokens, "peak_gpu_bytes": peak,
                "predicted_peak_gpu_bytes": predicted, "within_prediction": None if peak is None else peak <= predicted,
            })  # fmt: skip
    out = {
        "model": NAME, "materialised": "random bf16 weights made on the planned devices, dispatched with "
        "accelerate.dispatch_model (no checkpoint: 131 GiB does not fit the node's disk)",
        "plan": {"hardware": plan.hardware, "render": plan.render(), "bytes_per_device": plan.bytes_per_device,
                 "layers_per_device": plan.layers_per_device, "rows_per_device": plan.rows_per_device,
                 "seq_len": seq, "budget": {str(k): v for k, v in budget.items()}},
        "gpu_allocated_after_load": gpu_after_load, "cpu_weight_bytes": plan.bytes_per_device.get("cpu", 0),
        "row_bytes_estimate": per_row, "largest_spilled_module_bytes": largest_spilled,
        "grids": grids,
        "speedup_largest_vs_batch1": grids[-1]["tok_per_s"] / grids[0]["tok_per_s"],
        "gpu_budget_bytes": budget.get(0), "gpu_total_bytes": totals.get(0),
    }  # fmt: skip
    del model
    free(scale.device)
    return out


def _module_bytes(model, name: str) -> int:
    """Bytes of the weights of module `name` (spilled modules are on the meta device after dispatch:
    their sizes are still known)."""
    mod = model.get_submodule(name)
    return sum(p.numel() * p.element_size() for p in mod.parameters())
