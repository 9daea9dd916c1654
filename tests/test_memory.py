"""Memory planning per device, `task=plan`'s headroom and rows, OOM back-off, Slurm tasks as workers,
and the offline hub id: all on CPU (device maps naming GPUs are planned on meta models)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from helpers.checkout import ROOT
from helpers.config import make
from helpers.models import tiny_llama
from transformers import LlamaConfig

from steersweep.core.errors import LoadError
from steersweep.model import memory as M
from steersweep.model.placement import empty_model, quantization_config, quantized_params
from steersweep.pipeline.tasks import plan
from steersweep.runs.distributed import Dist

GiB = 2**30
# 8 layers, 8 query heads of 64, 2 KV heads, hidden 512, MLP 1024, vocab 1000
CFG = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
LAYERS = [f"model.layers.{i}" for i in range(8)]
# one row in one layer at 100 tokens, bf16: K and V of 2 heads x 64 per token
KV_LAYER = 100 * 2 * 2 * 64 * 2  # 51,200
ACT = 100 * (4 * 512 + 2 * 1024) * 2  # 819,200: one layer's transient buffers
LOGITS = 2 * 1000 * 4  # 8,000


def test_rows_per_device_charge_each_device_its_own_layers():
    dmap = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 0,
            "model.layers.3": 1, "model.layers.4": 1, "model.layers.5": 1, "model.layers.6": 1,
            "model.layers.7": 1, "model.norm": 1, "lm_head": 1}  # fmt: skip
    free = {"cuda:0": 100_000_000, "cuda:1": 100_000_000}
    shares = M.execution_shares(dmap, LAYERS, "lm_head")
    assert shares == {"cuda:0": M.Share(3, False), "cuda:1": M.Share(5, True)}
    rows = M.rows_on_devices(CFG, shares, free, 2, 100)
    assert rows == {
        "cuda:0": 100_000_000 // (3 * KV_LAYER + ACT),
        "cuda:1": 100_000_000 // (5 * KV_LAYER + ACT + LOGITS),
    }
    n = M.rows_for_map(CFG, dmap, LAYERS, "lm_head", free, 2, 100, cap=10_000)
    assert n == min(rows.values()) == 100_000_000 // 1_083_200
    # the old rule charged all 8 layers' cache to the tightest device: fewer rows than really fit
    assert n > 100_000_000 // M.row_bytes(CFG, 100, 2)
    assert M.rows_for_map(CFG, dmap, LAYERS, "lm_head", free, 2, 100, cap=7) == 7


def test_layers_spilled_to_cpu_run_and_cache_on_the_main_gpu():
    """accelerate runs CPU- and disk-placed modules on the main device: their KV cache is made there."""
    dmap = {"model.embed_tokens": 1, "model.layers.0": 1, "model.layers.1": 2, "model.layers.2": "cpu",
            "model.layers.3": "disk", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip
    shares = M.execution_shares(dmap, LAYERS, "lm_head")
    # layers 4-7 fall under the "model.layers" key (longest prefix), so run on the main GPU too
    assert shares == {"cuda:1": M.Share(7, True), "cuda:2": M.Share(1, False)}
    rows = M.rows_on_devices(CFG, shares, {"cuda:1": 10**8, "cuda:2": 10**8, "cpu": 10**12}, 2, 100)
    assert rows == {"cuda:1": 10**8 // (7 * KV_LAYER + ACT + LOGITS), "cuda:2": 10**8 // (KV_LAYER + ACT)}


def test_whole_model_key_counts_every_layer():
    """accelerate writes a model that fits one device as {"": device}: every layer is there."""
    assert M.execution_shares({"": 7}, LAYERS, "lm_head") == {"cuda:7": M.Share(8, True)}
    assert M.execution_shares({"": "cpu"}, LAYERS, "lm_head") == {"cpu": M.Share(8, True)}
    assert M.rows_on_devices(CFG, {"cpu": M.Share(8, True)}, {}, 2, 100) == {"cpu": 0}  # nothing free: 0 rows


def test_live_rows_on_cpu_follow_the_job_memory_limit(monkeypatch):
    """On CPU the free figure is the job's limit less this process (runtime.cpu_budget), not half the node."""
    model = tiny_llama(layers=4, hidden=64, vocab=1000)
    per_row = (
        4 * 2 * 2 * 16 * 4 * 2000  # 4 layers x K,V x 2 KV heads x head_dim 16 x fp32 x 2000 tokens
        + 2000 * (4 * 64 + 2 * 128) * 4
        + 2 * 1000 * 4
    )
    from steersweep.core.runtime import current_rss

    rss = current_rss()
    limit_mib = rss // 2**20 + 400  # a job that may hold 400 MiB more than this process holds now
    monkeypatch.setenv("SLURM_MEM_PER_NODE", str(limit_mib))
    expected = int(0.9 * (limit_mib * 2**20 - rss)) // per_row
    got = M.rows_that_fit(model, 2000, cap=10_000)
    assert abs(got - expected) <= max(2, expected // 50), (got, expected)  # RSS moves a little between reads
    assert got < 10_000


def test_is_oom_on_real_allocator_errors():
    with pytest.raises(RuntimeError) as ei:
        torch.empty(2**62, dtype=torch.uint8)
    assert M.is_oom(ei.value)
    assert not M.is_oom(RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"))
    assert not M.is_oom(ValueError("out of memory."))
    assert M.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))


def test_backoff_halves_until_the_batch_fits():
    tried = []

    def score(bs: int) -> list[int]:
        tried.append(bs)
        if bs > 4:
            torch.empty(2**62, dtype=torch.uint8)  # a real CPU allocator failure
        return [x * x for x in range(10)]

    assert M.with_backoff(score, 32, "test") == [x * x for x in range(10)]
    assert tried == [32, 16, 8, 4]

    def cublas(bs: int) -> int:  # accelerate does not recognise this one: is_oom does
        if bs > 1:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return bs

    assert M.with_backoff(cublas, 8, "test") == 1

    def broken(bs: int):
        raise RuntimeError("The size of tensor a (3) must match the size of tensor b (4)")

    with pytest.raises(RuntimeError, match="must match"):
        M.with_backoff(broken, 8, "test")

    def never(bs: int):
        torch.empty(2**62, dtype=torch.uint8)

    with pytest.raises(RuntimeError, match="out of memory with 1 row per batch"):
        M.with_backoff(never, 4, "test")


def test_scoring_under_backoff_equals_plain_scoring():
    from steersweep.scoring.metrics import perplexities

    model = tiny_llama(vocab=1000)
    prompts, comps = [[1, 5, 9], [1, 7], [1, 3, 4, 8]], [[11, 12], [13], [14, 15, 16]]
    plain = [perplexities(model, [p], [c], 2)[0] for p, c in zip(prompts, comps, strict=True)]
    got = M.with_backoff(lambda bs: perplexities(model, prompts, comps, 2, bs), 32, "perplexity")
    assert got == pytest.approx(plain, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# task=plan


def test_plan_prints_headroom_and_rows_per_device(capsys):
    cfg = make("task=plan", "model=llama70b", "model.path=/nonexistent/llama70b", "generation.max_new_tokens=64",
               "memory.plan_hardware=[2x80GiB,1x80GiB+256GiB]")  # fmt: skip
    (p2, p1), said = plan(cfg)
    out = "\n".join(said)
    seq = int(re.search(r"rows sized for (\d+) tokens", out).group(1))
    assert seq >= 64
    # 2 x 80 GiB: ~65.7 GiB of weights each; headroom is the rest of the card
    for i in (0, 1):
        w = p2.bytes_per_device[str(i)]
        assert 60 * GiB < w < 70 * GiB
        assert p2.headroom[f"cuda:{i}"] == 80 * GiB - w
    # per device: KV of its own 40 layers (8 KV heads x 128, bf16) + one layer's activations (+ logits on the head's)
    kv40 = 40 * 2 * 8 * 128 * 2 * seq
    act = seq * (4 * 8192 + 2 * 28672) * 2
    assert p2.rows_per_device["cuda:0"] == int(0.9 * p2.headroom["cuda:0"]) // (kv40 + act)
    assert p2.rows_per_device["cuda:1"] == int(0.9 * p2.headroom["cuda:1"]) // (kv40 + act + 2 * 128256 * 4)
    assert f"up to {p2.rows} rows per generate call at {seq} tokens" in out
    assert re.search(r"cuda:0: weights +6\d\.\d\d GiB, +40 decoder layers; headroom +1\d\.\d\d GiB -> \d+ rows", out)
    # 1 x 80 GiB + CPU: spilled layers run on cuda:0 and keep their cache there
    assert p1.runs_on == "cuda:0" and not p1.fits_on_gpus
    assert p1.layers_per_device["cpu"] > 0
    kv_all = 80 * 2 * 8 * 128 * 2 * seq
    assert p1.rows_per_device == {"cuda:0": int(0.9 * p1.headroom["cuda:0"]) // (kv_all + act + 2 * 128256 * 4)}
    assert "they run on cuda:0, their KV cache too" in out
    assert ("disk" in p1.bytes_per_device) == ("does NOT load as configured" in out)


def test_plan_of_default_model_has_no_empty_layer_rows(capsys):
    """The embedded model fits one GPU: accelerate maps it as {"": last GPU}; every layer is counted."""
    plans, said = plan(make("task=plan"))
    out = "\n".join(said)
    for p in plans:
        assert sum(p.layers_per_device.values()) == 30, p.layers_per_device
    assert not re.search(r"GiB, +0 decoder layers", out), out
    assert "a replica (0.30 GiB) fits on one GPU: 8 at once, one process per GPU: sbatch --ntasks-per-node=8" in out


def test_plan_honours_4bit_quantization(capsys):
    base = "model=llama70b", "model.path=/nonexistent/llama70b", "memory.plan_hardware=[1x80GiB]"
    (bf16,), _ = plan(make("task=plan", *base))
    (q4,), said = plan(make("task=plan", *base, "model.quantization=4bit"))
    out = "\n".join(said)
    assert "4bit quantized" in out and "0.5 bytes/param" in out
    # reference, written out: decoder linear weights at 0.5 bytes, embeddings + head + norms at 2
    c = make("model=llama70b").model
    from steersweep.model.checkpoint import read_model_config

    hf = read_model_config(c, need_checkpoint=False)
    h, inter = hf.hidden_size, hf.intermediate_size
    kv = hf.num_key_value_heads * (h // hf.num_attention_heads)
    linear = hf.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    rest = 2 * hf.vocab_size * h + (2 * hf.num_hidden_layers + 1) * h
    assert q4.fits_on_gpus and q4.bytes_per_device["0"] == pytest.approx(linear * 0.5 + rest * 2, rel=1e-3)
    assert not bf16.fits_on_gpus  # 131 GiB of bf16 weights do not fit one 80 GiB card
    assert q4.rows > 0


def test_quantized_params_keep_the_head_and_embeddings():
    model = empty_model(CFG)
    names = quantized_params(model)
    assert len(names) == 8 * 7  # q, k, v, o, gate, up, down per layer
    assert "lm_head.weight" not in names and not any("embed" in n or "norm" in n for n in names)


def test_quantization_without_bitsandbytes_or_cuda_is_one_line():
    import importlib.util

    c = make("model.quantization=4bit").model
    with pytest.raises(LoadError) as ei:
        quantization_config(c, torch.bfloat16, may_spill=True)
    msg = str(ei.value)
    assert "\n" not in msg
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "needs bitsandbytes: pip install -e '.[quant]'" in msg
    else:
        assert "needs a CUDA GPU" in msg
    assert quantization_config(make().model, torch.bfloat16, may_spill=True) is None


# ---------------------------------------------------------------------------------------------
# Slurm tasks as workers; the hub id without network


def test_slurm_tasks_are_independent_workers():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "2"}
    d = Dist.of(make("data_parallel=true").data_parallel, env)
    assert (d.rank, d.world, d.independent, d.is_main) == (2, 4, True, True)
    assert d.local_gpu == (None if not torch.cuda.is_available() else d.local_gpu)
    assert d.broadcast("x") == "x" and d.gather({"a": 1}) == [{"a": 1}]
    d.raise_any(None)
    with pytest.raises(KeyError):
        d.raise_any(KeyError("own"))
    assert Dist.of(make().data_parallel, env).world == 1  # without data_parallel the tasks are not split
    assert Dist.of(make("data_parallel=true").data_parallel, {}).world == 1


@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_without_network_fails_with_one_line(offline, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env["HF_HOME"] = str(tmp_path)  # nothing cached there
    r = subprocess.run(
        [sys.executable, "run_experiment.py", "model=llama8b", "model.path=meta-llama/Meta-Llama-3-8B-Instruct"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "neither a local folder nor reachable on the hub: " in errors[0]
    why = r"HF_HUB_OFFLINE is set" if offline else r"no network: huggingface\.co:443 unreachable \([^)]+\)"
    assert re.search(why + r", and the local hub cache does not hold it; download it and set model\.path", errors[0])
    assert "thrown while requesting" not in r.stderr + r.stdout  # no retry warnings before it
