"""Throughput with Llama-3-8B held fully on the GPU (random bf16 weights, EOS masked).

One workload, as `make bench` builds it (benchmarks/steerbench): `tput_rows` distinct (layer, alpha)
rows of one prompt each. Timed on it: our grid (every row in one `generate_rows` call), the
steering-vectors library per setting, one cell per call, and unsteered HF `generate` at the same
batch; the last two and the library on `tput_subset` settings (tok/s is a rate). Batch-1 decoding
against the bandwidth bound (weight bytes per token over the measured device-to-device copy
bandwidth); the grid's step against its bound at that batch (the larger of weight bytes over the
bandwidth and FLOPs over the measured bf16 matmul peak). Profiles of one grid step and one batch-1
step are always taken (kernel time against launch and Python gaps, the top operators): docs/gpu.md
reads them for whichever target is missed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import Scale, free, prompt_ids, random_model, shipped_config, tokenizer, vectors

NAME = "llama3_8b_instruct"


def _workload(model, tok, scale: Scale):
    from steerbench.workload import Cell, Workload

    n = model.config.num_hidden_layers
    vec = vectors(n, model.config.hidden_size)
    layers = sorted({round(n * f) for f in (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)})
    ids = prompt_ids(tok, 1)
    cells = [Cell(layers[i % len(layers)], 1.0 + i / 16, 0, i) for i in range(scale.tput_rows)]
    return Workload("grid", ids, cells, {layer: vec[layer] for layer in layers}, scale.tput_tokens)


def _hf_generate(model, tok, w, device: torch.device) -> dict:
    """Unsteered HF `generate`, the grid's rows (same prompt ids, same batch), EOS masked."""
    from steerbench.machine import timed

    from steersweep.generation.decode import left_pad
    from steersweep.inputs.encoding import pad_id_of

    pad = pad_id_of(tok)
    ids, mask = left_pad(w.ids(list(range(len(w.cells)))), pad)
    kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, pad_token_id=pad,
              use_cache=True)  # fmt: skip
    with torch.inference_mode():
        model.generate(**kw, max_new_tokens=2, min_new_tokens=2)  # warm-up
        out, s = timed(lambda: model.generate(**kw, max_new_tokens=w.tokens, min_new_tokens=w.tokens), device)
    tokens = out[:, ids.shape[1] :].numel()  # EOS masked: every row decodes w.tokens
    return {"rows": len(w.cells), "tokens": tokens, "seconds": s, "tok_per_s": tokens / s}


def _batch1(model, tok, scale: Scale, device: torch.device, bandwidth: float, wb: int) -> dict:
    from steerbench.machine import timed

    from steersweep.generation.decode import generate_rows

    from .common import gen_config

    v = vectors(model.config.num_hidden_layers, model.config.hidden_size)
    layer = model.config.num_hidden_layers // 2
    p = prompt_ids(tok, 1)
    generate_rows(model, tok, p, [(layer, 2.0, v[layer])], gen_config(4))  # warm-up
    out, s = timed(lambda: generate_rows(model, tok, p, [(layer, 2.0, v[layer])], gen_config(scale.batch1_tokens)),
                   device)  # fmt: skip
    tok_s = out[0].n_new_tokens / s
    return {"tokens": out[0].n_new_tokens, "seconds": s, "tok_per_s": tok_s, "weight_bytes": wb,
            "weight_bytes_per_s": wb * tok_s, "fraction_of_bandwidth_bound": wb * tok_s / bandwidth}  # fmt: skip


def _with_gaps(prof: dict) -> dict:
    """The profile with kernel time vs the rest of the step (kernel launches, Python, hooks): the shares of
    the profiled step's wall time spent in operators (device time on CUDA) and outside them."""
    s = prof["share_of_profiled_step"]
    kernels = s["gemm"] + s["attention"] + s["other_ops"]
    return {**prof, "kernel_share": kernels, "gap_share": max(0.0, 1.0 - kernels)}


def run(scale: Scale, kit: Path, work: Path, log, partial: dict) -> dict:
    from steerbench import machine as mach
    from steerbench.methods import grid, per_cell, per_setting
    from steerbench.profile import profile_step
    from steerbench.workload import min_new_tokens

    device = torch.device(scale.device)
    model = random_model(shipped_config(NAME, scale), torch.bfloat16, scale.device)
    tok = tokenizer(kit)
    w = _workload(model, tok, scale)
    bw = mach.copy_bandwidth(device, scale.copy_bytes)
    peak = mach.gemm_peak(torch.bfloat16, device, scale.gemm_n)
    subset = list(range(scale.tput_subset))
    wb = mach.param_counts(model)[1]  # weight bytes, tied weights once
    partial.update(copy_bandwidth_bytes_per_s=bw, bf16_matmul_flop_per_s=peak)
    with min_new_tokens(model, w.tokens):
        ours = grid.run(model, tok, w, 0, device)
        partial["grid"] = ours.summary()
        setting = per_setting.run(model, tok, w, device, only=subset)
        partial["per_setting"] = setting.summary()
        cell = per_cell.run(model, tok, w, device, only=subset)
        partial["per_cell"] = cell.summary()
        hf = partial["hf_generate"] = _hf_generate(model, tok, w, device)
        b1 = partial["batch1"] = _batch1(model, tok, scale, device, bw, wb)
        prof = _with_gaps(profile_step(model, tok, w, list(range(len(w.cells))), device))
        prof1 = _with_gaps(profile_step(model, tok, w, [0], device))
    rows = len(w.cells)
    step_s = rows / ours.tok_per_s  # one decoding step of the whole batch
    context = w.padded_prompt_len + w.tokens / 2
    bound_s = max(wb / bw, rows * mach.flops_per_token(model, context) / peak)
    out = {
        "model": NAME, "rows": rows, "tokens_per_row": w.tokens, "weight_bytes": wb,
        "copy_bandwidth_bytes_per_s": bw, "bf16_matmul_flop_per_s": peak,
        "grid": ours.summary(), "per_setting": setting.summary(), "per_cell": cell.summary(), "hf_generate": hf,
        "batch1": b1, "grid_step_seconds": step_s, "grid_bound_step_seconds": bound_s,
        "grid_fraction_of_bound": bound_s / step_s,
        "grid_vs_per_setting": ours.tok_per_s / setting.tok_per_s,
        "grid_vs_hf_generate": ours.tok_per_s / hf["tok_per_s"],
        "grid_vs_per_cell": ours.tok_per_s / cell.tok_per_s,
        "equal_tokens_grid_vs_per_cell": sum(ours.out[i] == cell.out[i] for i in subset), "compared_cells": len(subset),
        "profile_grid_step": prof, "profile_batch1_step": prof1,
    }  # fmt: skip
    del model
    free(scale.device)
    return out
