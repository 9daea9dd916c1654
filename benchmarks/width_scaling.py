"""The grid's compute-bound fraction as the model gets wider: is the miss the loop's or the model's?

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/width_scaling.py            # 135M shape, then 1.5B
    PYTHONPATH=benchmarks .venv/bin/python benchmarks/width_scaling.py 2048,24,32,8,8192

`make bench` measures the grid against the compute bound on the embedded model (hidden 576), where a
decoding step's element-wise ops, attention and per-op dispatch (which grow with the hidden size)
weigh as much as its matrix products (which grow with its square). This runs make bench's main
workload (8 prompts x alphas -1 0 0.5 1 x three layers at 1/3, 1/2, 3/5 of the depth, T = 64, all
cells in one `generate_rows` call) through our grid alone on randomly initialised models of the
embedded model's family at the given shapes (hidden, layers, heads, kv heads, intermediate), in the
dtype `auto` picks, and prints the same fraction as make bench (decoded tokens only) and the one
that also counts the prompt pass's FLOPs as it performs them. Random weights make nonsense text;
the bound and the time do not depend on it. A measurement, not a test.
"""

from __future__ import annotations

import sys
import time

import torch

SHAPES = ["576,30,9,3,1536", "2048,24,32,8,8192"]  # the embedded model's; a 1.5B one of its family


def run(shape: str, tokens: int = 64) -> dict:
    from steerbench import machine as mach
    from steerbench.methods import grid
    from steerbench.workload import build, min_new_tokens
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from steersweep.inputs.datasets import load_prompts
    from steersweep.model.dtypes import torch_dtype
    from steersweep.model.embedded import DEFAULT_MODEL_DIR, prepare

    hidden, layers, heads, kv, inter = (int(x) for x in shape.split(","))
    path = prepare(DEFAULT_MODEL_DIR)
    cfg = AutoConfig.from_pretrained(path)
    cfg.update({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": kv, "intermediate_size": inter, "head_dim": hidden // heads})  # fmt: skip
    dtype = torch_dtype("auto")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    steered = [layers // 3, layers // 2, 3 * layers // 5]
    vectors = {layer: torch.randn(hidden) for layer in steered}
    prompts = [p["prompt"] for p in load_prompts("prompts_default")][:8]
    w = build("main", tok, prompts, steered, [-1.0, 0.0, 0.5, 1.0], vectors, tokens)
    device = torch.device("cpu")
    cells = list(range(len(w.cells)))
    with min_new_tokens(model, tokens):
        t0 = time.perf_counter()
        m = grid.run(model, tok, w, 0, device)
    wall = time.perf_counter() - t0
    peak = mach.gemm_peak(dtype, device, 2048)
    width = w.padded_prompt_len
    fpt = mach.flops_per_token(model, width + tokens / 2)
    decoded = w.distinct(cells) * tokens
    layer_rows = w.prefill_layer_rows(cells, layers)
    prefill = mach.prefill_flops(model, layer_rows, w.distinct(cells), width)
    return {
        "shape": shape,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "dtype": str(dtype).removeprefix("torch."),
        "grid_s": m.seconds,
        "wall_s": wall,
        "gemm_peak_gflop_s": peak / 1e9,
        "fraction": decoded * fpt / m.seconds / peak,
        "fraction_with_prefill": (decoded * fpt + prefill) / m.seconds / peak,
        "prefill_layer_rows": f"{layer_rows} of {w.distinct(cells) * layers}",
    }


def main(argv: list[str]) -> int:
    print("shape (hidden,layers,heads,kv,inter)  params  dtype     grid s  GEMM peak  compute bound  with prefill")
    for shape in argv or SHAPES:
        r = run(shape)
        print(f"{r['shape']:<37} {r['params_m']:>5.0f}M  {r['dtype']:<8} {r['grid_s']:>7.1f}  "
              f"{r['gemm_peak_gflop_s']:>5.0f} GF/s  {r['fraction']:>12.1%}  {r['fraction_with_prefill']:>11.1%}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
