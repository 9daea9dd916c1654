"""What the machine can do, measured in the same run: GEMM peak, copy bandwidth, RSS, CPU contention.

Also the model-size arithmetic the bounds are computed from (FLOPs per token, weight and KV bytes).
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

GIB = 2**30


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_cpu_flags() -> list[str]:
    """The CPU flags that mean native bf16 GEMMs (what `dtype: auto` looks for)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def rss_peak_gib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def rss_now_gib() -> float:
    """Current resident set size of this process (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / GIB


def rss_both() -> dict[str, float]:
    return {"peak": round(rss_peak_gib(), 3), "current": round(rss_now_gib(), 3)}


def cpu_snapshot() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall time) from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy, ru.ru_utime + ru.ru_stime, time.perf_counter()


def other_cpu_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Average number of cores other processes kept busy between two snapshots."""
    wall = after[2] - before[2]
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall) if wall > 0 else 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), wall seconds), the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def gemm_peak(dtype: torch.dtype, device: torch.device, n: int, reps: int = 3) -> float:
    """Best-of-`reps` FLOP/s of F.linear on an n x n x n problem."""
    a = torch.randn(n, n, device=device).to(dtype)
    w = torch.randn(n, n, device=device).to(dtype)
    with torch.inference_mode():
        F.linear(a, w)  # warm-up
        best = min(timed(lambda: F.linear(a, w), device)[1] for _ in range(reps))
    return 2 * n**3 / best


def decode_gemm_ceiling(
    model, rows: int, device: torch.device, dtype: torch.dtype, reps: int = 3
) -> tuple[float, float]:
    """Seconds of the GEMMs of one decoding step at `rows` rows, and their FLOP/s.

    Times F.linear with the model's own weight shapes (every linear layer, lm_head included) on a
    [rows, in] input: the floor of a decoding step made of GEMMs only.
    """
    shapes: dict[tuple[int, int], int] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            key = (mod.out_features, mod.in_features)
            shapes[key] = shapes.get(key, 0) + 1
    total_s = flops = 0.0
    with torch.inference_mode():
        for (out_f, in_f), count in shapes.items():
            x = torch.randn(rows, in_f, device=device).to(dtype)
            w = torch.randn(out_f, in_f, device=device).to(dtype)
            F.linear(x, w)
            best = min(timed(lambda x=x, w=w: F.linear(x, w), device)[1] for _ in range(reps))
            total_s += best * count
            flops += 2.0 * rows * in_f * out_f * count
    return total_s, flops / total_s if total_s > 0 else 0.0


def copy_bandwidth(device: torch.device, nbytes: int = GIB, reps: int = 5) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = min(timed(lambda: y.copy_(x), device)[1] for _ in range(reps))
    return 2 * nbytes / best


def param_counts(model) -> tuple[int, int]:
    """(non-embedding parameters, total unique parameter bytes). Tied weights are counted once."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    total = sum(p.numel() for p in params)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    non_emb = total - emb.numel() - (0 if head is emb else head.numel())
    return non_emb, nbytes


def flops_per_token(model, context: float) -> float:
    """2 x non-embedding params + 2 x hidden x vocab (lm_head) + 4 x layers x hidden x context."""
    cfg = model.config
    non_emb, _ = param_counts(model)
    return (
        2.0 * non_emb + 2.0 * cfg.hidden_size * cfg.vocab_size + 4.0 * cfg.num_hidden_layers * cfg.hidden_size * context
    )


def prefill_flops(model, layer_rows: int, rows: int, width: int) -> float:
    """FLOPs of a prompt pass of `width` tokens that computes `layer_rows` decoder-layer rows (each
    layer once per distinct state entering it: `Workload.prefill_layer_rows`) and the head on the
    last position of `rows` rows: per layer and token 2 x its parameters + 2 x hidden x width (causal
    attention, half of the 4 x hidden x context of `flops_per_token`)."""
    cfg = model.config
    non_emb, _ = param_counts(model)
    per_layer_token = 2.0 * non_emb / cfg.num_hidden_layers + 2.0 * cfg.hidden_size * width
    return layer_rows * width * per_layer_token + rows * 2.0 * cfg.hidden_size * cfg.vocab_size


def kv_cache_bytes(model, rows: int, seq_len: int) -> int:
    """KV cache of `rows` rows of `seq_len` tokens in the model's dtype (steersweep.memory's formula)."""
    from steersweep.model.memory import kv_bytes_per_token

    return kv_bytes_per_token(model.config, next(model.parameters()).element_size()) * rows * seq_len
