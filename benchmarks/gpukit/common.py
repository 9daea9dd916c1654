"""What every check shares: the two scales, random models from the shipped configs, checkpoints on disk,
the kit's tokenizer, the run's own entry point, and device facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / ".gpukit"
GIB = 2**30
MIB = 2**20
# Dry-run shapes: the shipped configs with these keys replaced, so every code path runs in seconds on a CPU.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16}  # fmt: skip


@dataclass(frozen=True)
class Scale:
    """Sizes of every check: `gpu` is what the node measures, `dry` the same calls, tiny, on a CPU."""

    name: str
    device: str  # where models are held whole ("cuda:0" on the node, "cpu" in the dry run)
    shrink: bool  # tiny shapes (TINY and `layers`) instead of the shipped ones
    layers: dict[str, int] = field(default_factory=dict)  # decoder layers per config when shrunk
    split_prompts: int = 4  # split: prompts x 2 layers x 2 alphas rows, float32
    split_tokens: int = 24
    agree_prompts: int = 8  # split: bf16 grid vs single cell, prompts x 2 layers x 3 alphas
    agree_tokens: int = 32
    tput_rows: int = 96  # throughput: distinct (layer, alpha) rows of one grid call
    tput_tokens: int = 32
    tput_subset: int = 8  # settings timed for per-setting and per-cell (tok/s is a rate)
    batch1_tokens: int = 64
    gemm_n: int = 8192
    copy_bytes: int = GIB
    spill_rows: tuple[int, ...] = (1, 16, 64, 256)
    spill_tokens: int = 32
    sweep_tokens: int = 16  # load8b's and the resume check's sweeps through run_experiment.py

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


GPU = Scale("gpu", "cuda:0", shrink=False)
DRY = Scale(
    "dry", "cpu", shrink=True, layers={"llama3_8b_instruct": 6, "llama3_70b_instruct": 8, "smollm2_135m_instruct": 4},
    split_prompts=2, split_tokens=6, agree_prompts=2, agree_tokens=6, tput_rows=8, tput_tokens=4, tput_subset=2,
    batch1_tokens=4, gemm_n=256, copy_bytes=16 * MIB, spill_rows=(1, 4), spill_tokens=4, sweep_tokens=4,
)  # fmt: skip
SCALES = {"gpu": GPU, "dry": DRY}


def shipped_config(name: str, scale: Scale):
    """The shipped config.json `name` (steersweep/model_configs), shrunk in the dry run."""
    from transformers import AutoConfig

    from steersweep.model.checkpoint import MODEL_CONFIGS

    d = json.loads((MODEL_CONFIGS / f"{name}.json").read_text())
    if scale.shrink:
        d.update(TINY, num_hidden_layers=scale.layers[name])
    d.pop("transformers_version", None)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def random_model(config, dtype: torch.dtype, device: str):
    """A randomly initialised model built directly on `device` (no CPU copy of an 8B model first)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def tokenizer(kit: Path):
    """The embedded model's tokenizer, carried in the kit (its ids fit every shipped vocabulary)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(kit / "tokenizer")
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def write_checkpoint(model, kit: Path, folder: Path, shard: str = "2GB") -> tuple[Path, float, int]:
    """`model` saved as sharded safetensors with the kit's tokenizer: (folder, seconds, bytes on disk)."""
    t0 = time.perf_counter()
    model.save_pretrained(folder, max_shard_size=shard)
    tokenizer(kit).save_pretrained(folder)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return folder, round(time.perf_counter() - t0, 2), size


def vectors(n_layers: int, hidden: int, norm: float = 8.0) -> dict[int, torch.Tensor]:
    """A random steering vector per layer (the models are random: any direction steers as well)."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for layer in range(n_layers):
        v = torch.randn(hidden, generator=g)
        out[layer] = v * (norm / v.norm())
    return out


def prompt_ids(tok, n: int) -> list[list[int]]:
    """The first n of the shipped default prompts, encoded as a sweep encodes them (cycled past the end)."""
    from omegaconf import OmegaConf

    from steersweep.core.config import GenerationConfig
    from steersweep.inputs.datasets import load_prompts
    from steersweep.inputs.encoding import encode_prompts

    texts = [p["prompt"] for p in load_prompts("prompts_default")]
    texts = [texts[i % len(texts)] for i in range(n)]
    return encode_prompts(tok, texts, OmegaConf.structured(GenerationConfig()))


def gen_config(tokens: int):
    from omegaconf import OmegaConf

    from steersweep.core.config import GenerationConfig

    return OmegaConf.structured(GenerationConfig(max_new_tokens=tokens))


def free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def cli(args: list[str], log, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python run_experiment.py ARGS` as a user runs it, its output appended to the kit's log."""
    log.flush()
    return subprocess.run(
        [sys.executable, str(ROOT / "run_experiment.py"), *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def device_facts() -> dict:
    """The device as torch reports it, and the versions the kit ran on."""
    from steersweep.runs.provenance import package_versions

    facts = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)",
        "cuda": torch.version.cuda,
        "gpu_total_bytes": torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": package_versions(
            (
                "torch",
                "transformers",
                "accelerate",
                "huggingface-hub",
                "tokenizers",
                "safetensors",
                "hydra-core",
                "omegaconf",
                "submitit",
                "steering-vectors",
                "pandas",
                "pyarrow",
                "numpy",
            )
        ),  # fmt: skip
    }
    return facts
