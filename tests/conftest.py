"""Shared fixtures: tiny random Llamas (fast), the real embedded model (slow), and whole runs that several
test modules read. What is not a fixture lives in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.checkout import cli
from helpers.config import FP32, PRESET
from helpers.models import tiny_checkpoint, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def tiny():
    return tiny_llama()


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
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def direct(tmp_path_factory):
    """The phase1_small preset run directly (one process, no Slurm): the reference table."""
    import pandas as pd

    run_dir = tmp_path_factory.mktemp("direct") / "run"
    r = cli(PRESET, FP32, f"run_dir={run_dir}", "progress=false")
    assert r.returncode == 0, r.stderr[-3000:]
    return pd.read_parquet(run_dir / "results.parquet")


@pytest.fixture(scope="session")
def tiny_cli_run(tmp_path_factory, embedded_dir):
    """`python run_experiment.py` on a tiny random Llama (embedded tokenizer), from a clean folder:
    (the finished process, its run folder, the temporary folder holding both)."""
    tmp = tmp_path_factory.mktemp("tiny_cli_run")
    model_dir = tiny_checkpoint(tmp / "tiny", embedded_dir)
    cwd = tmp / "cwd"
    cwd.mkdir()
    r = cli(
        f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=2",
        "generation.max_new_tokens=4", "eval.behavior_limit=4", "steering.layers=[1]", "steering.alphas=[0,2]",
        f"results_root={tmp / 'results'}", "run_name=tiny", "progress=false", cwd=cwd,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = (tmp / "results").iterdir()
    return r, run, tmp
