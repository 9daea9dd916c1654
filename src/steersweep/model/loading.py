"""Loading the checkpoint once, on the device map `placement` planned, with a neutral generation config.

`offload_state_dict` is never passed (it makes transformers stage the whole state dict through CPU
and disk while loading, which stalls or hangs 70B loads; transformers 5 ignores it anyway). Loading
runs under a watchdog that dumps every thread's stack and exits when it stalls, so a hang is
diagnosed from the log instead of waited on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import torch

from steersweep.core.config import MemoryConfig, ModelConfig
from steersweep.core.faults import fault_point
from steersweep.core.runtime import watchdog
from steersweep.core.units import fmt_bytes
from steersweep.hooks.trunk import contiguous_head
from steersweep.model.checkpoint import _looks_like_hub_id, hub_online, resolve_model_path
from steersweep.model.dtypes import dtype_decision, torch_dtype
from steersweep.model.memory import device_key, module_names, placed_on
from steersweep.model.placement import _max_memory, quantization_config

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Load


# Keys of a generation config that name tokens, not decoding choices: kept from the checkpoint.
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def neutral_generation_config(model) -> dict:
    """Replace the checkpoint's generation defaults with neutral ones; return what it shipped.

    Checkpoints ship decoding defaults (Qwen2.5: repetition_penalty 1.05, temperature, top_p,
    top_k): left in place, `generate` applies them to "greedy" runs too. Only the special-token ids
    are kept; every sampling, penalty and length setting of a run is then exactly what
    generation/decode.py passes (max_new_tokens, and the per-row sampler when sampling).
    """
    from transformers import GenerationConfig

    old = model.generation_config
    shipped = old.to_diff_dict()
    model.generation_config = GenerationConfig(
        **{k: getattr(old, k) for k in TOKEN_KEYS if getattr(old, k, None) is not None}
    )
    changed = {
        k: v
        for k, v in shipped.items()
        if k not in TOKEN_KEYS and not k.startswith("_") and k != "transformers_version"
    }
    if changed:
        log.info("ignoring the checkpoint's generation defaults %s: decoding is set by conf/generation", changed)
    return shipped


def load_model(model_cfg: ModelConfig, mem: MemoryConfig, gpu: int | None = None):
    """Load tokenizer and model once: device_map + max_memory, never offload_state_dict.

    Args:
        gpu: data-parallel replica: use only this GPU (its budget), no other device.

    Returns:
        (model, tokenizer, info) where info records the budget, device map and per-device layers.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_cfg)
    budget, cpu_why = _max_memory(mem)
    if gpu is not None:
        budget = {gpu: budget[gpu]}
    else:  # a replica pinned to one GPU never spills to the CPU, so the CPU limit only matters here
        log.info("CPU budget: %s (%s)", fmt_bytes(budget.get("cpu", 0)), cpu_why)
    kwargs: dict = {
        "device_map": model_cfg.device_map,
        "max_memory": budget,
        "dtype": torch_dtype(model_cfg.dtype),
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if mem.disk_offload:
        kwargs["offload_folder"] = mem.offload_folder
    if model_cfg.quantization:  # the int8 CPU-offload flag whenever the budget lets weights leave the GPUs
        may_spill = "cpu" in budget or mem.disk_offload
        kwargs["quantization_config"] = quantization_config(model_cfg, kwargs["dtype"], may_spill)
    if not Path(path).is_dir() and _looks_like_hub_id(path) and not hub_online()[0]:
        kwargs["local_files_only"] = True  # offline: the hub cache only, no ~23 s of retries
    dtype = dtype_decision(model_cfg.dtype)
    log.info("dtype %s -> %s (%s)", dtype["config"], dtype["used"], dtype["reason"])
    log.info("memory budget: %s", {k: fmt_bytes(v) for k, v in budget.items()})
    t0 = time.perf_counter()
    with watchdog(mem.load_timeout_s, f"loading {path}"):
        fault_point("load")
        tokenizer = AutoTokenizer.from_pretrained(
            path,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            local_files_only=kwargs.get("local_files_only", False),
        )
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    model.requires_grad_(False)
    contiguous_head(model)  # frozen weights + a strided last-token slice: see hooks.contiguous_head
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    shipped = neutral_generation_config(model)
    dmap = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    # placement from the map: a layer offloaded to the CPU or disk holds meta tensors, not its device
    per_dev = Counter(device_key(placed_on(dmap, n)) for n in module_names(model, model_cfg.layers_path)[0])
    info = {
        "path": path,
        "dtype": dtype,
        "load_seconds": round(time.perf_counter() - t0, 2),
        "max_memory": {str(k): v for k, v in budget.items()},
        "device_map": {k: str(v) for k, v in dmap.items()},
        "layers_per_device": dict(per_dev),
        # what the checkpoint's generation_config.json asked for, and what generation really uses
        "generation_config_shipped": shipped,
        "generation_config_effective": model.generation_config.to_diff_dict(),
        "gpu_allocated": {f"cuda:{i}": torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())},
    }
    log.info(
        "loaded %s in %.1f s; decoder layers per device: %s",
        path,
        info["load_seconds"],
        dict(per_dev),
    )
    for dev, n in info["gpu_allocated"].items():
        log.info("%s allocated after load: %s", dev, fmt_bytes(n))
    return model, tokenizer, info
