"""Diagnosis: how much the EOS-heavy workload's static batching wastes, and notes on missed targets."""

from __future__ import annotations

import torch

from . import machine as mach
from .methods import has_engine
from .profile import describe, profile_step
from .workload import Method, Workload

GIB = mach.GIB


def eos_stats(w: Workload, em: dict[str, Method]) -> dict:
    """How much of static batching's work the EOS-heavy workload wastes (from the loop's rows)."""
    loop = em["loop"]
    lens = {i: len(o) for i, o in loop.out.items()}
    cap = w.tokens
    steps = {i: min(n + 1, cap) for i, n in lens.items()}  # an EOS costs a step too
    static_row_steps = sum(len(g) * max(steps[i] for i in g) for g in w.batches(0))
    useful = sum(steps.values())
    return {
        "max_new_tokens": cap,
        "mean_new_tokens": sum(lens.values()) / max(len(lens), 1),
        "eos_fraction": sum(1 for n in lens.values() if n < cap) / max(len(lens), 1),
        "static_row_steps": static_row_steps,
        "useful_row_steps": useful,
        "ideal_speedup": static_row_steps / useful if useful else None,
    }


def miss_notes(
    missed: set[str], profile: dict, model, tok, w: Workload, mm: dict[str, Method], device: torch.device,
    batch: int, nums: dict,
) -> list[str]:  # fmt: skip
    """Plain-language notes on where the time or memory of each missed target goes (`nums`: main's numbers)."""
    b, c, d = mm["per_cell"], mm["per_setting"], mm["grid"]
    groups = w.batches(batch)
    peak, fpt, values, eos = nums["peak"], nums["fpt"], nums["values"], nums["eos"]
    dtype = next(model.parameters()).dtype
    rows_d = len(groups[0])
    bound_tps = peak / fpt
    notes = [f"grid decoding step ({rows_d} rows, profiled): {describe(profile['grid_step'])}"]
    if "compute_bound_fraction" in missed:
        gemm_s, gemm_rate = mach.decode_gemm_ceiling(model, rows_d, device, dtype)
        pre = profile["grid_step"]["prefill_seconds"] * len(groups)
        shared, unshared = nums["prefill_layer_rows"]
        notes.append(
            f"compute bound {peak / 1e9:.0f} GFLOP/s / {fpt / 1e6:.0f} MFLOP per token = {bound_tps:.0f} tok/s; the grid "
            f"decodes {values['compute_bound_fraction'] * bound_tps:.0f} ({values['compute_bound_fraction']:.0%}). Its GEMMs alone, as bare F.linear calls "
            f"of the model's shapes at {rows_d} rows, run at {gemm_rate / 1e9:.0f} GFLOP/s ({gemm_rate / peak:.0%} of the "
            f"peak): a step made of GEMMs only would give {rows_d / gemm_s / bound_tps:.0%} of the bound. Prefill (shared "
            f"below the layers that steer rows apart: {shared} of {unshared} decoder-layer rows) takes "
            f"{pre / d.seconds:.0%} of the grid's time and is not counted in FLOPs per generated token (counting it: "
            f"{(nums['decoded'] * fpt + nums['prefill_flops']) / d.seconds / peak:.0%}); the rest is attention, element-wise ops and "
            "per-op dispatch"
        )
    if missed & {"grid_vs_per_cell", "grid_vs_per_setting"}:
        one = profile_step(model, tok, w, [0], device)
        profile["batch1_step"] = one
        t1 = b.seconds / max(b.tokens, 1)
        td = d.seconds / max(d.calls * w.tokens, 1)
        max_b, max_c = bound_tps / b.tok_per_s, bound_tps / c.tok_per_s
        notes.append(
            f"batch-1 decoding step (per_cell's shape, profiled): {describe(one)}. A grid step costs {td / t1:.1f}x a "
            f"batch-1 step for {rows_d}x the rows. per_cell runs at {b.tok_per_s / bound_tps:.0%} and per_setting at "
            f"{c.tok_per_s / bound_tps:.0%} of the compute bound, so a grid at 100% of it would give at most "
            f"grid/per_cell = {max_b:.1f} and grid/per_setting = {max_c:.1f}"
        )
    if "peak_rss_over_weights_plus_kv" in missed:
        phases = ", ".join(f"{k} {v['peak']:.2f}/{v['current']:.2f}" for k, v in nums["rss_phases"].items())
        notes.append(
            f"peak RSS {nums['peak_rss']:.2f} GiB, runtime {nums['runtime_gib']:.2f} GiB, weights + KV "
            f"{nums['wkv_gib']:.3f} GiB (weights {nums['weight_bytes'] / GIB:.3f}). Peak/current RSS (GiB) after each "
            f"phase: {phases}"
        )
    if "eos_loop_vs_static" in missed:
        notes.append(
            f"EOS-heavy: static batching decodes {eos['static_row_steps']} row-steps for {eos['useful_row_steps']} "
            f"useful ones: dropping finished rows can give at most {eos['ideal_speedup']:.2f}x here"
            + ("" if has_engine() else "; generate_rows has no decode loop yet (no engine= keyword)")
        )
    return notes
