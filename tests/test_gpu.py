"""GPU paths that need the embedded model and bitsandbytes, on a node with a package index
(`make gpu-check`; skipped without CUDA): 4-bit loads (whole, and spilling with the int8 CPU-offload
flag) and the rows estimate honoured on the device. Each test adds its figure to the one-line summary
printed at the end.

The GPU/CPU split, bf16 agreement, throughput and bandwidth checks live in the GPU check kit
(benchmarks/gpukit, docs/gpu.md), which runs on an offline node with random weights.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from steersweep.core.config import GenerationConfig, MemoryConfig, ModelConfig
from steersweep.generation.decode import generate_rows
from steersweep.inputs.datasets import load_prompts
from steersweep.inputs.encoding import encode_prompts
from steersweep.model import memory as M
from steersweep.model.loading import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
SUMMARY: dict[str, str] = {}
MiB = 2**20


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    if SUMMARY:
        print("\ngpu-check: " + "; ".join(f"{k}: {v}" for k, v in SUMMARY.items()), flush=True)


def load(embedded_dir, dtype: str, gpu_bytes: int | None = None, quantization: str | None = None):
    """The embedded model through the run's loader; `gpu_bytes` caps GPU 0's budget (the rest spills to CPU)."""
    total = torch.cuda.get_device_properties(0).total_memory
    mcfg = ModelConfig(name="smollm2_135m", path=str(embedded_dir), dtype=dtype, quantization=quantization)
    mem = MemoryConfig(gpu_fraction=gpu_bytes / total if gpu_bytes else 0.9, cpu="auto")
    return load_model(mcfg, mem)


def free_gpu() -> None:
    """Give the cached blocks of a test's models back (call after `del model`)."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def vector(hidden: int, norm: float = 8.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(hidden, generator=g)
    return v * (norm / v.norm())


def prompts(tok, n: int, gen: GenerationConfig) -> list[list[int]]:
    return encode_prompts(tok, [p["prompt"] for p in load_prompts("prompts_default")][:n], gen)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes: .[quant]")
@pytest.mark.parametrize("spill", [False, True])
def test_4bit_load_steers(embedded_dir, spill):
    gen = GenerationConfig(max_new_tokens=24)
    model, tok, info = load(embedded_dir, "bfloat16", gpu_bytes=60 * MiB if spill else None, quantization="4bit")
    assert getattr(model, "is_loaded_in_4bit", False)
    if spill:  # llm_int8_enable_fp32_cpu_offload: spilled modules stay unquantized on the CPU
        assert "cpu" in set(info["device_map"].values()), info["device_map"]
    n = sum(p.numel() for p in model.parameters())
    foot = model.get_memory_footprint()
    v = vector(model.config.hidden_size, norm=30.0)
    p = prompts(tok, 1, gen)[0]
    outs = generate_rows(model, tok, [p, p], [(10, 0.0, v), (10, 4.0, v)], gen)
    assert outs[0].token_ids != outs[1].token_ids  # steering changes a 4-bit model's text
    key = "4-bit load" + (" with CPU spill" if spill else "")
    SUMMARY[key] = f"ok, {foot / MiB:.0f} MiB ({foot / n:.2f} bytes/param)"
    if not spill:
        assert foot < 0.7 * 2 * n  # well under bf16 (embeddings and head stay bf16)
    del model
    free_gpu()


def test_rows_estimate_holds_on_the_device(embedded_dir):
    """Generate as many rows as `memory.rows_on_devices` says 256 MiB hold: the peak stays under 256 MiB."""
    model, tok, _ = load(embedded_dir, "bfloat16")
    gen = GenerationConfig(max_new_tokens=64)
    ids = prompts(tok, 16, gen)
    longest = max(ids, key=len)
    seq = len(longest) + gen.max_new_tokens
    free = 256 * MiB
    shares = M.execution_shares(M.device_map_of(model), *M.module_names(model))
    rows = M.rows_on_devices(model.config, shares, {"cuda:0": free}, 2, seq)["cuda:0"]
    assert rows > 1
    v = vector(model.config.hidden_size)
    steering = [(10, 1.0 + i / 1000, v) for i in range(rows)]  # distinct rows: none deduplicated
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(0)
    torch.cuda.reset_peak_memory_stats(0)
    generate_rows(model, tok, [longest] * rows, steering, gen)
    peak = torch.cuda.max_memory_allocated(0) - base
    SUMMARY["rows estimate"] = f"{rows} rows of {seq} tokens in 256 MiB: peak {peak / MiB:.0f} MiB ({peak / free:.0%})"
    assert peak <= free, f"{rows} rows peaked at {peak / MiB:.0f} MiB > 256 MiB: the per-row estimate is too low"
    del model
    free_gpu()
