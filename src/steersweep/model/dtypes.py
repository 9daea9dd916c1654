"""The model's dtype: `auto` picks bfloat16 where the machine computes it natively (CUDA, CPUs with
AVX512-BF16 or AMX) and float32 elsewhere, and says why."""

from __future__ import annotations

import functools

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": None}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def auto_dtype() -> tuple[torch.dtype, str]:
    """What `dtype: auto` means on this machine, and why: the fastest dtype it computes natively.

    Decided on the machine, not assumed: CPUs with AVX512-BF16 or AMX run bfloat16 GEMMs 2-3x
    faster than float32 (measured 357-435 vs 100-189 GFLOP/s on a 2-core AVX512-BF16 Xeon), while
    CPUs without them emulate bfloat16 several times slower than float32 (16-19 vs 120-144 GFLOP/s
    on a 2-core AVX2 EPYC).
    """
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, f"{torch.cuda.get_device_name(0)} computes bfloat16 natively"
        return torch.float16, f"{torch.cuda.get_device_name(0)} has no native bfloat16 (compute capability < 8.0)"
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in cpu_flags()]
    if native:
        return torch.bfloat16, f"CPU-only; the CPU has {native[0]} (native bfloat16 matrix multiply)"
    return torch.float32, "CPU-only; the CPU has neither AVX512-BF16 nor AMX, so bfloat16 would be emulated (slower)"


def torch_dtype(name: str) -> torch.dtype:
    """Config dtype -> torch dtype; "auto" is decided on this machine (`auto_dtype`)."""
    if name == "auto":
        return auto_dtype()[0]
    return DTYPES[name]


def resolved_dtype_name(name: str) -> str:
    """The dtype a config's `model.dtype` means on this machine ("auto" resolved)."""
    return str(torch_dtype(name)).removeprefix("torch.")


def dtype_decision(name: str) -> dict:
    """The dtype record for logs and the manifest: asked, used, and why."""
    used = resolved_dtype_name(name)
    return {"config": name, "used": used, "reason": auto_dtype()[1] if name == "auto" else "set in the config"}
