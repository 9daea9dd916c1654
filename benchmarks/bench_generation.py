"""Throughput benchmark of steered generation: seed loop vs per cell vs per setting vs the whole grid.

The workload is a steering sweep on the embedded chat model (SmolLM2-135M-Instruct): P prompts x
A alphas x L layers cells (default 8 x 4 x 3 = 96), T new greedy tokens each (default 64), run by

  (a) seed_loop   `steersweep.baselines.seed_loop_generate`: a full forward pass per new token, no
                  KV cache, one cell at a time (field report 02's workaround). It is slow, so it is
                  timed on `--seed-cells` cells only and reported per token.
  (b) per_cell    one HF `generate` call (KV cache, steering hook) per cell: batch of 1.
  (c) per_setting one `generate` call per (layer, alpha) with the P prompts batched: what users of the
                  `steering-vectors` library get (its `SteeringVector.apply` context is used when the
                  package imports; otherwise `generate_rows` with one setting per call).
  (d) grid        ours: `steersweep.generation.generate_rows` with every cell a row of one call
                  (or `--batch` rows per call), each row steered by its own (layer, alpha, vector).

Every method makes exactly T tokens per row: EOS is suppressed for the first T tokens
(`min_new_tokens = T` on the model's generation config, which `generate_rows` inherits, and as a
`generate` argument for the library). Throughput is generated tokens / wall seconds of the timed
calls (prompt encoding, model loading and vector computation excluded; prefill included). The seed
loop cannot suppress EOS, so it is compared with the others only up to its first EOS.

The same run measures the machine's GEMM peak (fp32 and bf16), the compute-bound fraction of (d),
peak RSS vs weights + KV cache, and checks that (b), (c) and (d) produce the same tokens. Results go
to a printed table and `results/bench/bench.json`; see benchmarks/README.md.

    .venv/bin/python benchmarks/bench_generation.py [--prompts 8] [--alphas -1 0 0.5 1]
        [--layers 10 14 18] [--tokens 64] [--dtype float32|bfloat16] [--batch 0] [--seed-cells 4]
        [--threads N] [--out results/bench/bench.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# Targets from the issue: grid/per_cell, grid/per_setting, grid/seed_loop, compute-bound fraction,
# and peak RSS over (weights + KV cache).
TARGETS = {
    "vs_per_cell": 20.0,
    "vs_per_setting": 4.0,
    "vs_seed_loop": 50.0,
    "compute_bound_fraction": 0.5,
    "peak_rss_over_weights_plus_kv": 1.5,
}

Row = tuple[int, float, torch.Tensor]  # (layer, alpha, vector)


@dataclass
class Cell:
    layer: int
    alpha: float
    prompt: int  # index into the encoded prompts


@dataclass
class Method:
    """Timing and tokens of one generation method."""

    name: str
    impl: str
    calls: int = 0
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    out: dict[int, list[int]] = field(default_factory=dict)  # cell index -> new token ids

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Set-up


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="number of prompts P (first P of prompts_default)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[-1.0, 0.0, 0.5, 1.0], help="steering alphas")
    ap.add_argument("--layers", type=int, nargs="+", default=[10, 14, 18], help="steered decoder layers")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens T per cell (EOS suppressed until T)")
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="model dtype; default bfloat16 on CUDA, float32 on CPU (bf16 GEMMs are much slower on AVX2)",
    )
    ap.add_argument("--batch", type=int, default=0, help="rows per generate call for (d); 0 = all cells in one call")
    ap.add_argument("--seed-cells", type=int, default=4, help="cells timed through the seed loop (a); 0 = skip")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "bench.json", help="JSON output path")
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.tokens < 1 or args.batch < 0 or args.seed_cells < 0:
        ap.error("--prompts and --tokens must be >= 1, --batch and --seed-cells >= 0")
    return args


def quiet() -> None:
    """Silence progress bars and generation warnings so the table stays readable."""
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("steersweep").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def rss_now_gib() -> float:
    """Current resident set size of this process (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / GIB


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


def rss_both() -> dict[str, float]:
    return {"peak": round(rss_gib(), 3), "current": round(rss_now_gib(), 3)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Machine measurements


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

    Times F.linear with the model's own weight shapes (every linear layer of every decoder layer,
    plus the lm_head) on a [rows, in] input: the floor of a decoding step made of GEMMs only.
    """
    shapes: dict[tuple[int, int], int] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            key = (mod.out_features, mod.in_features)
            shapes[key] = shapes.get(key, 0) + 1
    total_s = 0.0
    flops = 0.0
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


# ---------------------------------------------------------------------------------------------
# Model size arithmetic


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


def kv_cache_bytes(model, rows: int, seq_len: int, dtype: torch.dtype) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes x rows x sequence length."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return (
        2 * cfg.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size() * rows * seq_len
    )


# ---------------------------------------------------------------------------------------------
# The four methods


def run_seed_loop(model, prompt_ids, cells: list[Cell], idx: list[int], vectors, tokens: int, device) -> Method:
    from steersweep.baselines import seed_loop_generate

    m = Method("seed_loop", "steersweep.baselines.seed_loop_generate (no KV cache, 1 cell)")
    c0 = cells[idx[0]]
    seed_loop_generate(model, prompt_ids[c0.prompt], c0.layer, c0.alpha, vectors[c0.layer], 2)  # warm-up
    for i in idx:
        c = cells[i]
        out, s = timed(
            lambda c=c: seed_loop_generate(model, prompt_ids[c.prompt], c.layer, c.alpha, vectors[c.layer], tokens),
            device,
        )
        m.out[i] = out
        m.calls += 1
        m.rows += 1
        m.tokens += len(out)
        m.seconds += s
    return m


def run_generate_rows(
    name: str, impl: str, model, tok, prompt_ids, cells: list[Cell], groups: list[list[int]], vectors, gen, device
) -> Method:
    """One `generate_rows` call per group of cell indices."""
    from steersweep.generation import generate_rows

    m = Method(name, impl)

    def call(group: list[int], g=gen):
        ids = [prompt_ids[cells[i].prompt] for i in group]
        rows: list[Row] = [(cells[i].layer, cells[i].alpha, vectors[cells[i].layer]) for i in group]
        return generate_rows(model, tok, ids, rows, g)

    # Warm-up: the first group, 2 tokens.
    from omegaconf import OmegaConf

    min_new = model.generation_config.min_new_tokens
    model.generation_config.min_new_tokens = 2
    try:
        call(groups[0], OmegaConf.merge(gen, {"max_new_tokens": 2}))
    finally:
        model.generation_config.min_new_tokens = min_new
    for group in groups:
        outs, s = timed(lambda group=group: call(group), device)
        for i, o in zip(group, outs, strict=True):
            m.out[i] = o.token_ids
            m.tokens += o.n_new_tokens
        m.calls += 1
        m.rows += len(group)
        m.seconds += s
    return m


def steering_vectors_library() -> tuple[Any, str]:
    """The `steering-vectors` SteeringVector class, or None and why it cannot be used."""
    try:
        from steering_vectors import SteeringVector
    except Exception as e:  # ImportError, or its sklearn dependency missing
        return None, f"{type(e).__name__}: {e}"
    return SteeringVector, ""


def run_per_setting_library(
    sv_cls, model, tok, prompt_ids, cells: list[Cell], groups: list[list[int]], vectors, tokens: int, device
) -> Method:
    """(c) with the steering-vectors library: one `SteeringVector.apply` context per (layer, alpha)."""
    import steering_vectors

    from steersweep.generation import left_pad

    m = Method("per_setting", f"steering-vectors {getattr(steering_vectors, '__version__', '')} SteeringVector.apply")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dtype = next(model.parameters()).dtype

    def call(group: list[int], n_new: int) -> list[list[int]]:
        c = cells[group[0]]
        sv = sv_cls(
            layer_activations={c.layer: vectors[c.layer].to(device=device, dtype=dtype)}, layer_type="decoder_block"
        )
        input_ids, mask = left_pad([prompt_ids[cells[i].prompt] for i in group], pad)
        with torch.inference_mode(), sv.apply(model, multiplier=c.alpha):
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=pad,
                use_cache=True,
            )
        return out[:, input_ids.shape[1] :].cpu().tolist()

    call(groups[0], 2)  # warm-up
    for group in groups:
        outs, s = timed(lambda group=group: call(group, tokens), device)
        for i, o in zip(group, outs, strict=True):
            m.out[i] = o
            m.tokens += len(o)
        m.calls += 1
        m.rows += len(group)
        m.seconds += s
    return m


# ---------------------------------------------------------------------------------------------
# Profile of one decoding step of the grid batch


def profile_step(model, tok, prompt_ids, cells: list[Cell], group: list[int], vectors, device) -> dict:
    """Prefill `group`'s rows (steered), time a decoding step unprofiled (best of 3), profile one more.

    Shares are of the profiled step's wall time: self time of GEMM ops (aten::mm/addmm/bmm or GEMM
    kernels), attention ops, all other aten ops, and (CPU only) the time outside any aten op.
    """
    from torch.profiler import ProfilerActivity, profile

    from steersweep.generation import left_pad
    from steersweep.hooks import row_deltas, steer

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids, mask = left_pad([prompt_ids[cells[i].prompt] for i in group], pad)
    input_ids, mask = input_ids.to(device), mask.to(device)
    rows = [(cells[i].layer, cells[i].alpha, vectors[cells[i].layer]) for i in group]
    cuda = device.type == "cuda"
    with torch.inference_mode(), steer(model, row_deltas(rows)):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out, prefill_s = timed(
            lambda: model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1),
            device,
        )
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)

        def step():
            nonlocal mask, nxt
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            p = mask.sum(-1, keepdim=True) - 1
            o = model(input_ids=nxt, attention_mask=mask, position_ids=p, past_key_values=cache, use_cache=True)
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)

        wall = min(timed(step, device)[1] for _ in range(3))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            _, prof_wall = timed(step, device)
    events = prof.key_averages()

    def self_us(e) -> float:
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)

    def category(name: str) -> str:
        n = name.lower()
        if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm") or any(
            k in n for k in ("gemm", "cutlass", "mkldnn_matmul", "sgemm")
        ):
            return "gemm"
        if any(k in n for k in ("scaled_dot_product", "flash", "attention", "softmax", "fmha")):
            return "attention"
        return "other_ops"

    shares = {"gemm": 0.0, "attention": 0.0, "other_ops": 0.0}
    for e in events:
        shares[category(e.key)] += self_us(e)
    op_us = sum(shares.values())
    prof_us = prof_wall * 1e6
    top = sorted(events, key=self_us, reverse=True)[:10]
    return {
        "rows": len(group),
        "prefill_seconds": prefill_s,
        "prefill_tokens": int(input_ids.numel()),
        "step_seconds_unprofiled": wall,
        "step_seconds_profiled": prof_wall,
        "share_of_profiled_step": {
            **{k: v / prof_us for k, v in shares.items()},
            "outside_ops": max(0.0, 1 - op_us / prof_us) if not cuda else None,
        },
        "top_ops": [
            {"op": e.key, "calls": int(e.count), "self_ms": round(self_us(e) / 1e3, 3), "share": self_us(e) / prof_us}
            for e in top
        ],
    }


def describe(prof: dict) -> str:
    """One line: step time and where it goes."""
    sh = prof["share_of_profiled_step"]
    parts = [f"GEMM {sh['gemm']:.0%}", f"attention {sh['attention']:.0%}", f"other aten ops {sh['other_ops']:.0%}"]
    if sh.get("outside_ops") is not None:
        parts.append(f"outside aten ops (Python, hooks, dispatch) {sh['outside_ops']:.0%}")
    top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in prof["top_ops"][:3])
    return f"{prof['step_seconds_unprofiled'] * 1e3:.1f} ms; " + ", ".join(parts) + f"; top ops: {top}"


# ---------------------------------------------------------------------------------------------
# Comparison


def compare(a: Method, b: Method, upto: dict[int, int] | None = None) -> tuple[int, int, str]:
    """(rows equal, rows compared, first difference) over the cells both methods ran."""
    common = sorted(set(a.out) & set(b.out))
    same = 0
    first = ""
    for i in common:
        k = upto.get(i) if upto else None
        x, y = a.out[i][:k], b.out[i][:k]
        if x == y:
            same += 1
        elif not first:
            pos = next((j for j, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
            first = f"cell {i}: {a.name} and {b.name} differ from token {pos}"
    return same, len(common), first


def evenly(n: int, k: int) -> list[int]:
    """k indices spread over range(n)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


# ---------------------------------------------------------------------------------------------
# Main


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet()
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steersweep.config import GenerationConfig
    from steersweep.data import load_jsonl, load_prompts
    from steersweep.embedded import DEFAULT_MODEL_DIR, prepare
    from steersweep.generation import encode_prompts
    from steersweep.vectors import compute_caa

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    T = args.tokens
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = load_prompts("prompts_default")
    if args.prompts > len(prompts):
        sys.exit(f"--prompts {args.prompts}: prompts_default has only {len(prompts)}")
    prompts = prompts[: args.prompts]
    rss_phases: dict[str, dict[str, float]] = {"start": rss_both()}
    load_before = os.getloadavg()
    snap0 = cpu_snapshot()
    time.sleep(1.0)
    others_at_start = other_cpu_cores(snap0, cpu_snapshot())
    snap_run = cpu_snapshot()

    # Machine: GEMM peaks in both dtypes, in this run.
    n = 8192 if device.type == "cuda" else 2048
    peaks = {name: gemm_peak(getattr(torch, name), device, n) for name in ("float32", "bfloat16")}
    print(
        f"GEMM peak ({n}^3 F.linear, best of 3): fp32 {peaks['float32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    rss_phases["gemm_peak"] = rss_both()

    # Model, prompts, vectors.
    path = prepare(DEFAULT_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    n_layers = model.config.num_hidden_layers
    bad = [layer for layer in args.layers if not 0 <= layer < n_layers]
    if bad:
        sys.exit(f"--layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=T))
    prompt_ids = encode_prompts(tok, [p["prompt"] for p in prompts], gen)
    pairs = load_jsonl("sentiment_pairs", ("positive", "negative"))
    vs = compute_caa(model, tok, pairs, sorted(set(args.layers)), "sentiment")
    vectors = {layer: v for layer, v in vs.vectors.items()}
    rss_phases["model_and_vectors"] = rss_both()
    # Exactly T tokens per row in every method: EOS is masked until T (generate_rows inherits this).
    model.generation_config.min_new_tokens = T

    cells = [Cell(layer, alpha, p) for layer in args.layers for alpha in args.alphas for p in range(len(prompts))]
    n_cells = len(cells)
    n_prompts = len(prompts)
    settings = [list(range(s, s + n_prompts)) for s in range(0, n_cells, n_prompts)]
    batch = args.batch or n_cells
    grid_groups = [list(range(s, min(s + batch, n_cells))) for s in range(0, n_cells, batch)]
    print(
        f"workload: {n_prompts} prompts x {len(args.alphas)} alphas x {len(args.layers)} layers = {n_cells} cells, "
        f"T={T}, {dtype_name} on {device.type}, {torch.get_num_threads()} threads, grid batch {batch}",
        flush=True,
    )

    methods: dict[str, Method] = {}
    notes: list[str] = []
    # (a) seed loop on a subset.
    seed_idx = evenly(n_cells, args.seed_cells) if args.seed_cells else []
    if seed_idx:
        methods["seed_loop"] = run_seed_loop(model, prompt_ids, cells, seed_idx, vectors, T, device)
        rss_phases["seed_loop"] = rss_both()
        print(f"  seed_loop done: {len(seed_idx)} cells, {methods['seed_loop'].seconds:.1f} s", flush=True)
        if len(seed_idx) < n_cells:
            notes.append(
                f"seed_loop (a) was timed on {len(seed_idx)} of {n_cells} cells (--seed-cells); its tok/s is "
                "per generated token over those cells, each a full T-token completion"
            )

    # (b) per cell.
    methods["per_cell"] = run_generate_rows(
        "per_cell", "steersweep.generation.generate_rows, 1 row per call", model, tok, prompt_ids, cells,
        [[i] for i in range(n_cells)], vectors, gen, device,
    )  # fmt: skip
    rss_phases["per_cell"] = rss_both()
    print(f"  per_cell done: {methods['per_cell'].seconds:.1f} s", flush=True)

    # (c) per setting: the steering-vectors library when it imports.
    sv_cls, why = steering_vectors_library()
    if sv_cls is not None:
        methods["per_setting"] = run_per_setting_library(
            sv_cls, model, tok, prompt_ids, cells, settings, vectors, T, device
        )
    else:
        methods["per_setting"] = run_generate_rows(
            "per_setting", "steersweep.generation.generate_rows, 1 (layer, alpha) per call", model, tok,
            prompt_ids, cells, settings, vectors, gen, device,
        )  # fmt: skip
        notes.append(f"steering-vectors not usable ({why}): per_setting (c) ran generate_rows one setting per call")
    rss_phases["per_setting"] = rss_both()
    print(f"  per_setting done: {methods['per_setting'].seconds:.1f} s", flush=True)

    # (d) ours: the whole grid.
    methods["grid"] = run_generate_rows(
        "grid", f"steersweep.generation.generate_rows, {batch} rows per call", model, tok, prompt_ids, cells,
        grid_groups, vectors, gen, device,
    )  # fmt: skip
    rss_phases["grid"] = rss_both()
    print(f"  grid done: {methods['grid'].seconds:.1f} s", flush=True)

    others_during = other_cpu_cores(snap_run, cpu_snapshot())
    busy = max(others_at_start, others_during)
    if busy > 0.25 and device.type == "cpu":
        notes.insert(
            0,
            f"the machine was shared: other processes kept {others_at_start:.1f} cores busy at the start and "
            f"{others_during:.1f} on average during the run ({os.cpu_count()} cores, {torch.get_num_threads()} "
            "threads here). A small multi-threaded GEMM stalls for a scheduler slice whenever another process "
            "holds a core its threads need, which inflates every method (small batches most); compare runs taken "
            "on an idle machine" + (", or pass --threads 1" if torch.get_num_threads() > 1 else ""),
        )

    # Token agreement.
    b, c, d = methods["per_cell"], methods["per_setting"], methods["grid"]
    short = [m.name for m in (b, c, d) if any(len(t) != T for t in m.out.values())]
    if short:
        notes.append(f"rows shorter than T={T} tokens in {short}: min_new_tokens was not honoured")
    match_detail = {}
    all_match = True
    for x, y in ((b, d), (c, d), (b, c)):
        same, total, first = compare(x, y)
        match_detail[f"{x.name}=={y.name}"] = f"{same}/{total} rows"
        all_match &= same == total
        if first:
            notes.append(f"token mismatch: {first}")
    seed_match = None
    if "seed_loop" in methods:
        a = methods["seed_loop"]
        eos = {tok.eos_token_id, *([model.config.eos_token_id] if isinstance(model.config.eos_token_id, int) else [])}
        upto = {i: next((j for j, t in enumerate(o) if t in eos), len(o)) for i, o in a.out.items()}
        same, total, first = compare(a, d, upto)
        match_detail["seed_loop==grid (up to the seed loop's first EOS)"] = f"{same}/{total} rows"
        seed_match = same == total
        if first:
            notes.append(f"token mismatch: {first}")

    # Throughput, ratios.
    tps = {
        k: (methods[k].tok_per_s if k in methods else None) for k in ("seed_loop", "per_cell", "per_setting", "grid")
    }
    grid_tps = tps["grid"]
    ratio = {f"vs_{k}": (grid_tps / v if v else None) for k, v in tps.items() if k != "grid"}

    # Compute bound.
    width = max(len(p) for p in prompt_ids)  # left-padded prompt length of the grid batch
    context = width + T / 2  # mean attended length over the decoding steps
    fpt = flops_per_token(model, context)
    peak = peaks[dtype_name]
    compute_bound_tps = peak / fpt
    compute_fraction = grid_tps / compute_bound_tps
    # The same with prefill FLOPs counted: padded prompt tokens at 2 x non-embedding params + attention over
    # half the prompt, plus one lm_head row per prompt row.
    cfg = model.config
    non_emb, _ = param_counts(model)
    prefill_flops = sum(
        len(g) * (width * (2.0 * non_emb + 4.0 * cfg.num_hidden_layers * cfg.hidden_size * width / 2))
        + len(g) * 2.0 * cfg.hidden_size * cfg.vocab_size
        for g in grid_groups
    )
    compute_fraction_prefill = (d.tokens * fpt + prefill_flops) / d.seconds / peak
    # Rows that repeat another: alpha 0 gives the same unsteered completion on every layer.
    dup = sum(1 for c0 in cells if c0.alpha == 0) - len({c0.prompt for c0 in cells if c0.alpha == 0})

    # Memory.
    _, weight_bytes = param_counts(model)
    kv_bytes = kv_cache_bytes(model, batch, width + T, dtype)
    wkv_gib = (weight_bytes + kv_bytes) / GIB
    peak_rss = rss_gib()
    rss_over_excl = (peak_rss - rss_phases["start"]["peak"]) / wkv_gib

    # Batch-1 memory-bandwidth bound (GPU only).
    bandwidth = None
    if device.type == "cuda":
        bw = copy_bandwidth(device)
        lat = b.seconds / b.tokens
        bandwidth = {
            "copy_bandwidth_gb_s": bw / 1e9,
            "per_token_latency_batch1_ms": lat * 1e3,
            "weights_bytes_per_latency_gb_s": weight_bytes / lat / 1e9,
            "fraction_of_bandwidth_bound": weight_bytes / lat / bw,
            "formula": "(weights bytes / per_cell seconds per token) / device-to-device copy bandwidth",
        }

    values = {
        "vs_per_cell": ratio["vs_per_cell"],
        "vs_per_setting": ratio["vs_per_setting"],
        "vs_seed_loop": ratio.get("vs_seed_loop"),
        "compute_bound_fraction": compute_fraction,
        "peak_rss_over_weights_plus_kv": peak_rss / wkv_gib,
    }
    targets = {}
    for k, target in TARGETS.items():
        v = values[k]
        met = None if v is None else (v <= target if k == "peak_rss_over_weights_plus_kv" else v >= target)
        targets[k] = {"target": target, "value": v, "met": met}

    # Where (d)'s time goes, when a target is missed.
    profile = None
    if any(t["met"] is False for t in targets.values()):
        rows_d = len(grid_groups[0])
        profile = profile_step(model, tok, prompt_ids, cells, grid_groups[0], vectors, device)
        gemm_s, gemm_rate = decode_gemm_ceiling(model, rows_d, device, dtype)
        profile["gemm_only_step_seconds"] = gemm_s
        profile["gemm_rate_at_decode_shapes_gflop_s"] = gemm_rate / 1e9
        notes.append(
            f"grid decoding step ({rows_d} rows, {dtype_name}, profiled): {describe(profile)}. Its GEMMs alone, timed "
            f"as bare F.linear calls of the model's shapes, take {gemm_s * 1e3:.1f} ms at {gemm_rate / 1e9:.0f} "
            f"GFLOP/s ({gemm_rate / peak:.0%} of the {n}^3 peak)"
        )
        if targets["compute_bound_fraction"]["met"] is False:
            gemm_tps = rows_d / gemm_s
            pre_s = profile["prefill_seconds"] * len(grid_groups)
            notes.append(
                f"prefill: the grid's prompts ({profile['prefill_tokens']} padded tokens per call) take "
                f"{profile['prefill_seconds']:.2f} s per call, {pre_s / d.seconds:.0%} of the grid's time, and are not "
                "counted in FLOPs per generated token; counting prefill FLOPs too, the grid runs at "
                f"{compute_fraction_prefill:.0%} of the GEMM peak"
                + (
                    f". {dup} of the {n_cells} rows repeat another row (alpha 0 is the same unsteered completion on "
                    f"every layer): generating those once would save {dup / n_cells:.0%} of the grid's work"
                    if dup
                    else ""
                )
            )
            notes.append(
                f"compute bound: {peak / 1e9:.0f} GFLOP/s / {fpt / 1e6:.0f} MFLOP per token = {compute_bound_tps:.0f} "
                f"tok/s; the grid reaches {grid_tps:.0f} ({compute_fraction:.0%}). Steps made of GEMMs only would give "
                f"{gemm_tps:.0f} tok/s ({gemm_tps / compute_bound_tps:.0%} of the bound): the gap between that and "
                f"100% is GEMMs of [{rows_d} x hidden] running below the large-GEMM peak; the gap between it and the "
                "grid is prefill, attention, element-wise ops (RMSNorm, RoPE, SiLU, KV-cache cat, steering add), "
                "per-op dispatch and generate's Python loop. What would remove it: more rows per GEMM (a bigger grid "
                "or --batch), fused kernels and a static KV cache (torch.compile), and on a GPU, CUDA graphs"
            )
        if targets["vs_per_cell"]["met"] is False or targets["vs_per_setting"]["met"] is False:
            one = profile_step(model, tok, prompt_ids, cells, [0], vectors, device)
            profile["batch1_step"] = one
            t1 = b.seconds / max(b.tokens, 1)
            tc = c.seconds / max(c.calls * T, 1)
            td = d.seconds / max(d.calls * T, 1)
            max_b = compute_bound_tps / tps["per_cell"]
            max_c = compute_bound_tps / tps["per_setting"]
            out_of_reach = [
                f"d/{k} >= {TARGETS['vs_' + n]:g}"
                for k, n, mx in (("b", "per_cell", max_b), ("c", "per_setting", max_c))
                if mx < TARGETS["vs_" + n]
            ]
            notes.append(
                f"batch-1 decoding step (per_cell's shape, profiled): {describe(one)}. Wall time per generate step: "
                f"(b) batch 1 {t1 * 1e3:.1f} ms, (c) batch {n_prompts} {tc * 1e3:.1f} ms, (d) batch {rows_d} "
                f"{td * 1e3:.1f} ms: a grid step costs {td / t1:.1f}x a batch-1 step for {rows_d}x the rows, so "
                f"d/b = {rows_d} / {td / t1:.1f} = {rows_d * t1 / td:.1f}. (b) runs at "
                f"{tps['per_cell'] / compute_bound_tps:.0%} and (c) at {tps['per_setting'] / compute_bound_tps:.0%} "
                f"of the compute bound, so even a grid at 100% of it would give at most d/b = {max_b:.1f} and "
                f"d/c = {max_c:.1f}: "
                + (
                    f"{' and '.join(out_of_reach)} cannot be reached for this model on this machine by any batching; "
                    "such ratios need a setting where batch 1 is much further from the compute bound (memory- or "
                    "launch-bound: larger models, GPUs)"
                    if out_of_reach
                    else "the shortfall is the grid's own distance from the compute bound (notes above)"
                )
            )
        if targets["peak_rss_over_weights_plus_kv"]["met"] is False:
            phases = ", ".join(f"{k} {v['peak']:.2f}/{v['current']:.2f}" for k, v in rss_phases.items())
            names = list(rss_phases)
            jumps = {
                names[k]: rss_phases[names[k]]["peak"] - rss_phases[names[k - 1]]["peak"] for k in range(1, len(names))
            }
            top_phase = max(jumps, key=jumps.get)
            notes.append(
                f"peak RSS {peak_rss:.2f} GiB vs weights + KV {wkv_gib:.2f} GiB. Peak/current RSS (GiB) after each "
                f"phase: {phases}; the largest rise (+{jumps[top_phase]:.2f} GiB) came in the {top_phase} phase. The "
                f"Python runtime and torch/oneDNN libraries take {rss_phases['start']['peak']:.2f} GiB before anything "
                f"is loaded, a fixed cost that weighs heavily against a 135M model: without it the ratio is "
                f"{rss_over_excl:.2f}. After loading, current RSS is {rss_phases['model_and_vectors']['current']:.2f} "
                f"GiB, {rss_phases['model_and_vectors']['current'] - rss_phases['start']['peak'] - weight_bytes / GIB:.2f}"
                f" GiB beyond runtime + {weight_bytes / GIB:.2f} GiB of {dtype_name} weights (most likely the mmapped "
                "bf16 checkpoint pages still resident). On a large model the ratio is governed by weights + KV"
            )

    result = {
        "tok_per_s": tps,
        "ratio": ratio,
        "compute_bound_fraction": compute_fraction,
        "peak_rss_gib": peak_rss,
        "weights_plus_kv_gib": wkv_gib,
        "peak_rss_over_weights_plus_kv_excluding_runtime": rss_over_excl,
        "tokens_match": all_match,
        "seed_loop_tokens_match": seed_match,
        "tokens_match_detail": match_detail,
        "targets": targets,
        "workload": {
            "model": str(path),
            "prompts": n_prompts,
            "alphas": list(args.alphas),
            "layers": list(args.layers),
            "cells": n_cells,
            "new_tokens": T,
            "grid_batch": batch,
            "seed_loop_cells": seed_idx,
            "padded_prompt_len": width,
            "eos": "suppressed until T tokens (min_new_tokens = T) in b, c, d; the seed loop is compared up to its first EOS",
        },
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": dtype_name,
            "threads": torch.get_num_threads(),
            "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "other_processes_cpu_cores": {"at_start": round(others_at_start, 2), "during_run": round(others_during, 2)},
            "python": platform.python_version(),
        },
        "methods": {
            k: {"impl": m.impl, "calls": m.calls, "rows": m.rows, "tokens": m.tokens, "seconds": m.seconds}
            for k, m in methods.items()
        },
        "gemm_peak_gflop_s": {k: v / 1e9 for k, v in peaks.items()},
        "gemm_peak_size": n,
        "flops_per_token": fpt,
        "flops_formula": (
            "2 x non-embedding params + 2 x hidden x vocab (lm_head) + 4 x layers x hidden x context, "
            f"context = padded prompt ({width}) + T/2 = {context:.0f}; decoding FLOPs only (prefill not counted)"
        ),
        "compute_bound_tok_per_s": compute_bound_tps,
        "compute_fraction_with_prefill": compute_fraction_prefill,
        "duplicate_rows": dup,
        "weights_gib": weight_bytes / GIB,
        "kv_cache_gib": kv_bytes / GIB,
        "kv_formula": "2 x layers x kv_heads x head_dim x bytes x grid rows x (padded prompt + T)",
        "rss_at_start_gib": rss_phases["start"]["peak"],
        "bandwidth_batch1": bandwidth,
        "profile_grid_step": profile,
        "rss_after_phase_gib": rss_phases,
        "notes": notes,
    }
    print_table(result, methods)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(r: dict, methods: dict[str, Method]) -> None:
    grid = r["tok_per_s"]["grid"]
    print(f"\n{'method':<12} {'calls':>6} {'rows':>5} {'tokens':>7} {'seconds':>9} {'tok/s':>9} {'grid x':>7}  impl")
    for k, m in methods.items():
        speed = grid / m.tok_per_s if m.tok_per_s else None
        print(
            f"{k:<12} {m.calls:>6} {m.rows:>5} {m.tokens:>7} {m.seconds:>9.2f} {m.tok_per_s:>9.1f} "
            f"{fmt(speed, '.2f'):>7}  {m.impl}"
        )
    print(
        f"\nGEMM peak: fp32 {r['gemm_peak_gflop_s']['float32']:.1f}, bf16 {r['gemm_peak_gflop_s']['bfloat16']:.1f} "
        f"GFLOP/s; {r['flops_per_token'] / 1e6:.0f} MFLOP/token -> compute bound "
        f"{r['compute_bound_tok_per_s']:.0f} tok/s ({r['machine']['dtype']}); grid at "
        f"{r['compute_bound_fraction']:.1%} ({r['compute_fraction_with_prefill']:.1%} of the peak counting prefill FLOPs)"
    )
    print(
        f"memory: peak RSS {r['peak_rss_gib']:.2f} GiB (at start {r['rss_at_start_gib']:.2f}); weights "
        f"{r['weights_gib']:.3f} + KV {r['kv_cache_gib']:.3f} = {r['weights_plus_kv_gib']:.3f} GiB"
    )
    if r["bandwidth_batch1"]:
        bw = r["bandwidth_batch1"]
        print(
            f"batch-1 bandwidth: {bw['weights_bytes_per_latency_gb_s']:.0f} of {bw['copy_bandwidth_gb_s']:.0f} GB/s "
            f"({bw['fraction_of_bandwidth_bound']:.1%})"
        )
    print(f"tokens match (b, c, d): {r['tokens_match']}  {r['tokens_match_detail']}")
    print(f"\n{'target':<32} {'wanted':>8} {'reached':>9}  met")
    for k, t in r["targets"].items():
        op = "<=" if k == "peak_rss_over_weights_plus_kv" else ">="
        print(f"{k:<32} {op + format(t['target'], 'g'):>8} {fmt(t['value'], '.2f'):>9}  {t['met']}")
    prof = r["profile_grid_step"]
    for p in (prof, (prof or {}).get("batch1_step")):
        if not p:
            continue
        print(f"\nprofile: one decoding step, {p['rows']} rows: {p['step_seconds_unprofiled'] * 1e3:.1f} ms unprofiled")
        for op in p["top_ops"]:
            print(f"  {op['op'][:48]:<48} {op['calls']:>6} calls {op['self_ms']:>9.2f} ms {op['share']:>6.1%}")
    if r["notes"]:
        print("\nnotes:")
        for note in r["notes"]:
            print(f"  - {note}")


if __name__ == "__main__":
    main()
