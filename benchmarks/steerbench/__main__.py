"""Run the benchmark: `PYTHONPATH=benchmarks python -m steerbench --help` (or `make bench ARGS=...`).

Phases, in one process on one loaded model (in the dtype `auto` picks, unless --dtype):
1. RSS with the code loaded (the model built on the meta device), before any weight is read: the fixed runtime;
2. ours first: the main workload's grid (greedy, exactly T tokens per row) and the EOS-heavy
   workload (sampled short answers) with the decode loop; then the peak RSS is read; then the peers:
   static batching on the EOS-heavy workload, and on the main one (a) the seed loop on a few cells,
   (b) per cell, (c) the steering-vectors library per (layer, alpha);
3. the GEMM peaks (float32, bfloat16), measured after the workloads;
4. profiles of a decoding step when a speed or memory target is missed;
5. float32 token agreement of grid, per-cell and per-setting: the main run's when it ran in
   float32, else a float32 copy of the model on a subset of the settings (the grid over all cells).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from . import machine as mach
from .diagnose import eos_stats, miss_notes
from .methods import grid, has_engine, per_cell, per_setting, seed_loop, static
from .profile import profile_step
from .report import agreement, compare, evaluate, print_report
from .workload import SHORT_ANSWERS, Method, build, evenly, load_model, min_new_tokens, sentiment_vectors

ROOT = Path(__file__).resolve().parents[2]
GIB = mach.GIB


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="steerbench", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder; default the embedded SmolLM2-135M")
    ap.add_argument("--prompts", type=int, default=8, help="main workload: first P prompts of prompts_default")
    ap.add_argument("--alphas", type=float, nargs="+", default=[-1.0, 0.0, 0.5, 1.0], help="steering alphas")
    ap.add_argument("--layers", type=int, nargs="+", default=[10, 14, 18], help="steered decoder layers")
    ap.add_argument("--tokens", type=int, default=64, help="main workload: new tokens T per cell (EOS suppressed)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="model dtype; auto = steersweep.loading.torch_dtype('auto'), what a sweep uses")  # fmt: skip
    ap.add_argument("--batch", type=int, default=0, help="grid rows per call; 0 = all cells in one call")
    ap.add_argument("--seed-cells", type=int, default=2, help="cells timed through the seed loop (a); 0 = skip")
    ap.add_argument("--eos-prompts", type=int, default=16, help="EOS-heavy workload: first N short-answer prompts")
    ap.add_argument("--eos-tokens", type=int, default=96, help="EOS-heavy workload: max_new_tokens")
    ap.add_argument("--eos-alphas", type=float, nargs="+", default=[0.0, 0.25],
                    help="EOS-heavy workload: alphas (small: strong steering makes this model ramble)")  # fmt: skip
    ap.add_argument("--check-settings", type=int, default=2,
                    help="float32 re-check (when the run's dtype is not float32): per-cell and per-setting on this "
                    "many (layer, alpha) settings, the grid on every cell; 0 = all settings")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "bench.json", help="JSON output path")
    args = ap.parse_args(argv)
    if min(args.prompts, args.tokens, args.eos_prompts, args.eos_tokens) < 1:
        ap.error("--prompts, --tokens, --eos-prompts and --eos-tokens must be >= 1")
    if min(args.batch, args.seed_cells, args.check_settings, args.threads) < 0:
        ap.error("--batch, --seed-cells, --check-settings and --threads must be >= 0")
    return args


def quiet() -> None:
    """Silence progress bars and generation warnings so the table stays readable."""
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("steersweep").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def say(msg: str) -> None:
    print(msg, flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from steersweep.inputs.datasets import load_prompts
    from steersweep.model import loading
    from steersweep.model.dtypes import torch_dtype
    from steersweep.model.embedded import DEFAULT_MODEL_DIR, prepare

    # Bad input and a missing library fail here, before anything expensive.
    try:
        per_setting.library()
    except per_setting.LibraryMissing as e:
        sys.exit(str(e))
    path = args.model or prepare(DEFAULT_MODEL_DIR)
    config = AutoConfig.from_pretrained(path)
    n_layers = config.num_hidden_layers
    bad = [layer for layer in args.layers if not 0 <= layer < n_layers]
    if bad:
        sys.exit(f"--layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    prompts = [p["prompt"] for p in load_prompts("prompts_default")]
    short = [p["prompt"] for p in load_prompts(str(SHORT_ANSWERS))]
    if args.prompts > len(prompts) or args.eos_prompts > len(short):
        sys.exit(f"--prompts is at most {len(prompts)} and --eos-prompts at most {len(short)} (the prompts shipped)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto = str(torch_dtype("auto")).removeprefix("torch.")
    auto_why = getattr(loading, "auto_dtype", lambda: (None, ""))()[1]  # the reason, where loading gives one
    dtype_name = auto if args.dtype == "auto" else args.dtype
    dtype = getattr(torch, dtype_name)
    T = args.tokens

    # 1. The fixed runtime: RSS once the interpreter, torch, transformers, the model's code (built on the
    # meta device, no memory) and the tokenizer are loaded, before any weight is read.
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)
    AutoTokenizer.from_pretrained(path)
    gc.collect()
    runtime_gib = mach.rss_now_gib()
    rss_phases = {"runtime": mach.rss_both()}
    load_before = os.getloadavg()
    snap0 = mach.cpu_snapshot()
    time.sleep(1.0)
    others_at_start = mach.other_cpu_cores(snap0, mach.cpu_snapshot())
    snap_run = mach.cpu_snapshot()
    model, tok = load_model(path, dtype, device)
    vectors = sentiment_vectors(model, tok, args.layers)
    main_w = build("main", tok, prompts[: args.prompts], args.layers, args.alphas, vectors, T)
    eos_w = build(
        "eos", tok, short[: args.eos_prompts], args.layers, args.eos_alphas, vectors, args.eos_tokens, sampled=True
    )
    rss_phases["model_and_vectors"] = mach.rss_both()
    batch = args.batch or len(main_w.cells)
    say(
        f"main workload: {args.prompts} prompts x {len(args.alphas)} alphas x {len(args.layers)} layers = "
        f"{len(main_w.cells)} cells, T={T}; EOS-heavy: {len(eos_w.cells)} sampled cells, max {args.eos_tokens} "
        f"tokens; {dtype_name} (auto: {auto}) on {device.type}, {torch.get_num_threads()} threads, grid batch {batch}"
    )

    # 2. Main workload: exactly T tokens per row in every method.
    notes: list[str] = []
    mm: dict[str, Method] = {}
    em: dict[str, Method] = {}

    def ran(m: Method, phase: str) -> Method:
        rss_phases[phase] = mach.rss_both()
        say(f"  {phase}: {m.seconds:.1f} s, {m.tok_per_s:.1f} tok/s")
        return m

    # 2a. Ours first, alone in the process so far: the sweep's peak RSS is read right after them (the
    # peers' buffers, which the allocator keeps, would otherwise count against it).
    with min_new_tokens(model, T):  # main: exactly T tokens per row in every method
        mm["grid"] = ran(grid.run(model, tok, main_w, batch, device), "grid")
    with min_new_tokens(model, None):  # EOS-heavy: rows stop at EOS
        em["loop"] = ran(grid.run(model, tok, eos_w, 0, device, engine="loop", name="loop"), "eos_loop")
    peak_rss = mach.rss_peak_gib()
    # 2b. The peers.
    with min_new_tokens(model, None):
        em["static"] = ran(static.run(model, tok, eos_w, 0, device), "eos_static")
    seed_idx = evenly(len(main_w.cells), args.seed_cells) if args.seed_cells else []
    with min_new_tokens(model, T):
        if seed_idx:
            mm["seed_loop"] = ran(seed_loop.run(model, main_w, seed_idx, device), "seed_loop")
        mm["per_cell"] = ran(per_cell.run(model, tok, main_w, device), "per_cell")
        mm["per_setting"] = ran(per_setting.run(model, tok, main_w, device), "per_setting")
    mm = {k: mm[k] for k in ("seed_loop", "per_cell", "per_setting", "grid") if k in mm}  # the table's order
    em = {k: em[k] for k in ("static", "loop")}
    short_rows = [m.name for m in mm.values() if m.name != "seed_loop" and any(len(t) != T for t in m.out.values())]
    if short_rows:
        notes.append(f"rows shorter than T={T} tokens in {short_rows}: min_new_tokens was not honoured")

    # The machine's GEMM peak in both dtypes, after the workloads so that its buffers do not count.
    n = 8192 if device.type == "cuda" else 2048
    peaks = {
        k: mach.gemm_peak(getattr(torch, k), device, n) for k in dict.fromkeys(("float32", "bfloat16", dtype_name))
    }
    say(f"GEMM peak ({n}^3 F.linear, best of 3): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    rss_phases["gemm_peak"] = mach.rss_both()
    others_during = mach.other_cpu_cores(snap_run, mach.cpu_snapshot())

    # Ratios, bounds, memory.
    a, b, c, d = (mm.get(k) for k in ("seed_loop", "per_cell", "per_setting", "grid"))
    ratio = {f"vs_{m.name}": d.tok_per_s / m.tok_per_s if m.tok_per_s else None for m in (a, b, c) if m}
    width = main_w.padded_prompt_len
    context = width + T / 2  # mean attended length over the decoding steps
    fpt = mach.flops_per_token(model, context)
    bound_tps = peaks[dtype_name] / fpt
    cfgm = model.config
    _, weight_bytes = mach.param_counts(model)
    groups = main_w.batches(batch)
    # Tokens the grid decoded: duplicate rows (alpha 0 on several layers) are made once, so they count
    # towards the sweep's output (tok/s) but not towards the FLOPs done (compute-bound fraction).
    decoded = sum(main_w.distinct(g) for g in groups) * T
    # The prompt pass as generate_rows runs it: distinct rows, each decoder layer once per distinct
    # state entering it (hooks.Trunk: rows of one prompt are one row below the layer steering them).
    prefill_layer_rows = sum(main_w.prefill_layer_rows(g, cfgm.num_hidden_layers) for g in groups)
    prefill_flops = mach.prefill_flops(model, prefill_layer_rows, decoded // T, width)
    kv_bytes = max(
        mach.kv_cache_bytes(model, len(groups[0]), width + T),
        mach.kv_cache_bytes(model, len(eos_w.cells), eos_w.padded_prompt_len + eos_w.tokens),
    )
    wkv_gib = (weight_bytes + kv_bytes) / GIB
    eos = eos_stats(eos_w, em)
    bandwidth = None
    if device.type == "cuda":
        bw = mach.copy_bandwidth(device)
        lat = b.seconds / max(b.tokens, 1)
        bandwidth = {
            "copy_bandwidth_gb_s": bw / 1e9,
            "per_token_latency_batch1_ms": lat * 1e3,
            "weights_bytes_per_latency_gb_s": weight_bytes / lat / 1e9,
            "fraction_of_bandwidth_bound": weight_bytes / lat / bw,
            "formula": "(weight bytes / per_cell seconds per token) / device-to-device copy bandwidth",
        }
    values = {
        "grid_vs_per_setting": ratio["vs_per_setting"],
        "grid_vs_per_cell": ratio["vs_per_cell"],
        "compute_bound_fraction": decoded / d.seconds / bound_tps,
        "peak_rss_over_weights_plus_kv": (peak_rss - runtime_gib) / wkv_gib,
        "eos_loop_vs_static": em["loop"].tok_per_s / em["static"].tok_per_s if em["static"].tok_per_s else None,
        "hbm_fraction_batch1": bandwidth["fraction_of_bandwidth_bound"] if bandwidth else None,
    }
    labels = {"compute_bound_fraction": f"grid / compute bound ({dtype_name})"}

    # 4. Profiles for missed speed and memory targets, on the model as it ran.
    provisional = evaluate(values, device.type == "cuda", labels)
    missed = {t["target"] for t in provisional if t["met"] is False}
    profile = {}
    if missed:
        profile["grid_step"] = profile_step(model, tok, main_w, groups[0], device)
        nums = {"peak": peaks[dtype_name], "fpt": fpt, "prefill_flops": prefill_flops, "rss_phases": rss_phases,
                "prefill_layer_rows": (prefill_layer_rows, decoded // T * cfgm.num_hidden_layers),
                "runtime_gib": runtime_gib, "peak_rss": peak_rss, "wkv_gib": wkv_gib, "weight_bytes": weight_bytes,
                "eos": eos, "values": values, "decoded": decoded}  # fmt: skip
        notes += miss_notes(missed, profile, model, tok, main_w, mm, device, batch, nums)

    # Token agreement in the run's dtype (bf16 results depend on the batch: information only).
    main_detail, *_ = agreement([b, c, d])
    if a:
        eos_ids = {tok.eos_token_id, *([cfgm.eos_token_id] if isinstance(cfgm.eos_token_id, int) else [])}
        upto = {i: next((j for j, t in enumerate(o) if t in eos_ids), len(o)) for i, o in a.out.items()}
        same, total, _ = compare(a, d, upto)
        main_detail["seed_loop==grid (up to the seed loop's first EOS)"] = f"{same}/{total} rows"
    same, total, _ = compare(em["static"], em["loop"])
    eos["loop==static"] = f"{same}/{total} rows"

    # 5. float32 agreement.
    f32_methods: dict[str, Method] = {}
    if dtype_name == "float32":
        detail, same, total, firsts = agreement([b, c, d])
        source = "the main run"
    else:
        del model
        gc.collect()
        model32, tok32 = load_model(path, torch.float32, device)
        w32 = build("main", tok32, prompts[: args.prompts], args.layers, args.alphas,
                    sentiment_vectors(model32, tok32, args.layers), T)  # fmt: skip
        settings = w32.settings()
        pick = [settings[k] for k in evenly(len(settings), args.check_settings or len(settings))]
        only = sorted(i for g in pick for i in g)
        with min_new_tokens(model32, T):
            f32_methods["per_cell"] = per_cell.run(model32, tok32, w32, device, only)
            f32_methods["per_setting"] = per_setting.run(model32, tok32, w32, device, only)
            f32_methods["grid"] = grid.run(model32, tok32, w32, batch, device)
        detail, same, total, firsts = agreement(list(f32_methods.values()))
        source = f"a float32 copy, {len(pick)} of {len(settings)} settings ({len(only)} cells); the grid ran all cells"
        say(f"  float32 check: {detail}")
        del model32
    values["float32_tokens_equal"] = same / total if total else None
    notes += [f"float32 token mismatch: {f}" for f in firsts]
    targets = evaluate(values, device.type == "cuda", labels)

    busy = max(others_at_start, others_during)
    if busy > 0.25 and device.type == "cpu":
        notes.insert(0, (
            f"the machine was shared: other processes kept {others_at_start:.1f} cores busy at the start and "
            f"{others_during:.1f} on average during the run ({os.cpu_count()} cores). Small multi-threaded GEMMs stall "
            "whenever another process holds a core (small batches most): compare runs taken on an idle machine"
        ))  # fmt: skip
    if seed_idx and len(seed_idx) < len(main_w.cells):
        notes.append(f"seed_loop (a) was timed on {len(seed_idx)} of {len(main_w.cells)} cells (--seed-cells)")
    if not has_engine():
        notes.append("generate_rows has no engine= keyword yet: the EOS workload's 'loop' ran its default path")

    result = {
        "targets": targets,
        "dtype": {
            "used": dtype_name,
            "auto": auto,
            "auto_reason": auto_why,
            "bf16_cpu_flags": mach.bf16_cpu_flags(),
            "auto_from": "steersweep.loading.torch_dtype('auto')",
        },
        "main": {
            "workload": main_w.describe()
            | {
                "grid_batch": batch,
                "seed_loop_cells": seed_idx,
                "eos": "suppressed until T (min_new_tokens = T)",
            },
            "methods": {k: m.summary() for k, m in mm.items()},
            "ratio": ratio,
            "tokens_equal_detail": main_detail,
            "duplicate_rows": len(main_w.cells) - main_w.distinct(list(range(len(main_w.cells)))),
        },
        "eos": eos | {"workload": eos_w.describe(), "methods": {k: m.summary() for k, m in em.items()}},
        "float32_check": {
            "source": source,
            "detail": detail,
            "rows_equal": same,
            "rows_compared": total,
            "methods": {k: m.summary() for k, m in f32_methods.items()},
        },
        "compute": {
            "flops_per_token": fpt,
            "flops_formula": "per decoded token (duplicate rows decoded once): 2 x non-embedding params + 2 x hidden x vocab + 4 x layers x hidden x context, context "
            f"= padded prompt ({width}) + T/2; decoding FLOPs only",
            "compute_bound_tok_per_s": bound_tps,
            "fraction": values["compute_bound_fraction"],
            "decoded_tokens": decoded,
            "fraction_with_prefill": (decoded * fpt + prefill_flops) / d.seconds / peaks[dtype_name],
            "prefill_layer_rows": prefill_layer_rows,
            "prefill_layer_rows_unshared": decoded // T * cfgm.num_hidden_layers,
        },
        "memory": {
            "peak_rss_gib": peak_rss,
            "runtime_gib": runtime_gib,
            "weights_gib": weight_bytes / GIB,
            "kv_cache_gib": kv_bytes / GIB,
            "kv_formula": "2 x layers x kv_heads x head_dim x bytes x rows x (padded prompt + new tokens), the larger "
            "of the main grid call and the EOS-heavy call",
            "peak_rss_over_weights_plus_kv_with_runtime": peak_rss / wkv_gib,
            "rss_after_phase_gib": rss_phases,
        },
        "gemm_peak_gflop_s": {k: v / 1e9 for k, v in peaks.items()},
        "gemm_peak_size": n,
        "bandwidth_batch1": bandwidth,
        "machine": {
            "cpu": mach.cpu_model(),
            "cores": os.cpu_count(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "steering_vectors": per_setting.version(),
            "python": platform.python_version(),
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "other_processes_cpu_cores": {"at_start": round(others_at_start, 2), "during_run": round(others_during, 2)},
            "model": str(path),
        },
        "profile": profile,
        "notes": notes,
    }
    print_report(result, {"main": mm, "eos": em} | ({"float32": f32_methods} if f32_methods else {}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
