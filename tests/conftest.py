"""Shared fixtures: tiny random Llamas (fast) and the real embedded model (slow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def readme_block(name: str) -> str:
    """The fenced python block after `<!-- readme-example: NAME ... -->` in README.md."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- readme-example: " + re.escape(name) + r"(?:\s[^>]*)?-->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no block marked readme-example: {name}"
    return m.group(1)


def tiny_llama(layers: int = 4, hidden: int = 32, vocab: int = 49152, seed: int = 0, dtype=torch.float32):
    """An untrained Llama small enough for exact identities in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 2
    return model


@pytest.fixture
def tiny():
    return tiny_llama()


def tiny_checkpoint(folder: Path, embedded_dir: Path, model=None) -> Path:
    """A tiny random Llama saved as a checkpoint folder with the embedded model's real tokenizer
    (runs through the CLI or `ss.Sweep` with `model.path=<folder>`, `model.num_hidden_layers=4`)."""
    from transformers import AutoTokenizer

    (model if model is not None else tiny_llama()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from steersweep.model.embedded import DEFAULT_MODEL_DIR, prepare

    return prepare(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    """The embedded model's real tokenizer (its files are local after `make setup`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def real_model(embedded_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()


PRESET = "experiment=phase1_small"  # 2 layers x 4 alphas x 6 prompts = 48 cells on the embedded model
# Runs compared with `direct` use other batch plans (shards, 4-row batches, ranks): rows equal across
# batch plans only in float32, so these comparisons pin it (bf16: same plan only, see test_faults).
FP32 = "model.dtype=float32"


@pytest.fixture(scope="session")
def direct(tmp_path_factory):
    """The phase1_small preset run directly (one process, no Slurm): the reference table."""
    import pandas as pd

    run_dir = tmp_path_factory.mktemp("direct") / "run"
    r = subprocess.run(
        [sys.executable, "run_experiment.py", PRESET, FP32, f"run_dir={run_dir}", "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return pd.read_parquet(run_dir / "results.parquet")
