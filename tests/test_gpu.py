"""GPU paths, run on first contact with a node (`make gpu-check`; skipped without CUDA).

On the embedded model: bf16 grid vs single-cell agreement (reported, not asserted: bf16 kernels are
not batch-invariant), a model split between cuda:0 and CPU spill steering exactly like the unsplit
one (float32), 4-bit loads (whole, and spilling with the int8 CPU-offload flag), the memory budget
and the rows estimate honoured on the device, and the batch-1 fraction of the memory bandwidth.
Each test adds its figure to the one-line summary printed at the end.
"""

from __future__ import annotations

import importlib.util
import time

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


def test_bf16_grid_vs_single_cell_agreement(embedded_dir):
    model, tok, _ = load(embedded_dir, "bfloat16")
    gen = GenerationConfig(max_new_tokens=32)
    v = vector(model.config.hidden_size)
    cells = [(p, (layer, a, v)) for p in prompts(tok, 8, gen) for layer in (10, 14) for a in (0.0, 2.0, 4.0)]
    grid = generate_rows(model, tok, [p for p, _ in cells], [s for _, s in cells], gen)
    single = [generate_rows(model, tok, [p], [s], gen)[0] for p, s in cells]
    same = sum(a.token_ids == b.token_ids for a, b in zip(grid, single, strict=True))
    SUMMARY["bf16 grid = single-cell"] = f"{same}/{len(cells)} completions"
    print(f"\nbf16: {same} of {len(cells)} single-cell completions equal the grid's (32 tokens, greedy)")
    assert all(o.n_new_tokens > 0 for o in grid)
    del model
    free_gpu()


def test_split_gpu_cpu_steers_like_the_unsplit_model(embedded_dir):
    """float32, layers on cuda:0 and layers spilled to the CPU (run on cuda:0 by accelerate), per-row
    steering on one layer of each side: tokens equal the model held whole on cuda:0."""
    gen = GenerationConfig(max_new_tokens=24)
    whole, tok, _ = load(embedded_dir, "float32")
    ids = prompts(tok, 4, gen)
    budget = 250 * MiB  # about half of the 540 MB of float32 weights
    split, _, info = load(embedded_dir, "float32", gpu_bytes=budget)
    dmap = split.hf_device_map
    on_gpu = [int(k.split(".")[-1]) for k, d in dmap.items() if ".layers." in k and d == 0]
    on_cpu = [int(k.split(".")[-1]) for k, d in dmap.items() if ".layers." in k and d == "cpu"]
    assert on_gpu and on_cpu, dmap
    assert torch.cuda.memory_allocated(0) <= budget + 64 * MiB  # the budget held (the whole model is elsewhere)
    v = vector(whole.config.hidden_size)
    steering = [(layer, a, v) for layer in (on_gpu[-1], on_cpu[-1]) for a in (0.0, 3.0)]
    rows = [p for p in ids for _ in steering]
    st = steering * len(ids)
    ref = generate_rows(whole, tok, rows, st, gen)
    got = generate_rows(split, tok, rows, st, gen)
    same = sum(a.token_ids == b.token_ids for a, b in zip(ref, got, strict=True))
    SUMMARY["split cuda:0+CPU = whole"] = f"{same}/{len(ref)} rows (layers {on_gpu[-1]} on GPU, {on_cpu[-1]} spilled)"
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert any(a.token_ids != b.token_ids for a, b in zip(ref[::2], ref[1::2], strict=True))  # steering acted
    del whole, split
    free_gpu()


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


def test_batch1_bandwidth_fraction(embedded_dir):
    """Batch-1 decoding reads every weight per token: weight bytes x tokens/s over the copy bandwidth."""
    model, tok, _ = load(embedded_dir, "bfloat16")
    gen = GenerationConfig(max_new_tokens=128)
    p = prompts(tok, 1, gen)[0]
    v = vector(model.config.hidden_size)
    generate_rows(model, tok, [p], [(10, 2.0, v)], GenerationConfig(max_new_tokens=8))  # warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate_rows(model, tok, [p], [(10, 2.0, v)], gen)[0]
    torch.cuda.synchronize()
    tok_s = out.n_new_tokens / (time.perf_counter() - t0)
    weights = sum(q.numel() * q.element_size() for q in model.parameters())
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t0)  # read + write
    frac = weights * tok_s / bw
    SUMMARY["batch-1 bandwidth"] = (
        f"{frac:.1%} of the {bw / 1e12:.2f} TB/s copy bandwidth ({tok_s:.0f} tok/s x {weights / MiB:.0f} MiB)"
    )
    print(f"\nbatch 1: {tok_s:.1f} tok/s, {weights * tok_s / 1e9:.1f} GB/s of weights = {frac:.1%} of copy bandwidth")
    assert out.n_new_tokens > 0
    del model
    free_gpu()
