"""Slow: the real embedded model, the real entry point, real Parquet files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers.checkout import ROOT

pytestmark = pytest.mark.slow


SECRET = "hf_" + "SeCrEt0123456789" * 2  # must never reach a manifest, a log or the table


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "run_experiment.py", *args, "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_TOKEN": SECRET},
    )  # fmt: skip


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default sweep exactly as `make run` runs it, into a temporary folder."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    r = run_cli(f"run_dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, r


def test_default_run_writes_every_row(default_run):
    run_dir, r = default_run
    df = pd.read_parquet(run_dir / "results.parquet")
    assert len(df) == 3 * 5 * 16  # layers x alphas x prompts
    assert df.cell_id.is_unique
    assert f"240 rows in {run_dir / 'results.parquet'}" in r.stdout
    assert set(df.stop_reason) <= {"eos", "length"}
    assert (df.n_new_tokens > 0).all()
    for col in ("behavior_prob", "perplexity", "word_rate_positive", "distinct_2", "alpha_rel"):
        assert df[col].notna().all(), col
    assert_one_baseline(df)
    assert (run_dir / "manifest.json").is_file() and (run_dir / "vectors.safetensors").is_file()


def assert_one_baseline(df: pd.DataFrame) -> None:
    """Alpha 0 is the unsteered model: one decode per prompt shared by every layer, in every dtype
    (the same completion and the same scores, not merely close ones)."""
    zero = df[df.alpha == 0]
    assert zero.layer.nunique() > 1
    cols = ["completion", "n_new_tokens", "perplexity", "behavior_prob", "next_token_kl", "batch_id"]
    per_prompt = zero.groupby("prompt_id")[[c for c in cols if c in zero]].nunique(dropna=False)
    assert (per_prompt == 1).all().all(), per_prompt[(per_prompt != 1).any(axis=1)]


def test_the_unsteered_baseline_is_one_baseline_in_bf16(tmp_path):
    """The grid that showed it (bf16, batches of 6 cutting through a prompt's layers): 8 of 16
    prompts had another "unsteered" completion at another layer before the baseline was one decode."""
    run_dir = tmp_path / "run"
    r = run_cli(f"run_dir={run_dir}", "steering.layers=[10,14,18]", "steering.alphas=[-1,0,1]", "prompts.limit=16",
                "generation.max_new_tokens=32", "generation.batch_size=6", "model.dtype=bfloat16",
                "report.enabled=false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_parquet(run_dir / "results.parquet")
    assert len(df) == 3 * 3 * 16
    assert_one_baseline(df)
    # a batch holds 6 decodes: a prompt's 3 alpha-0 cells count as one
    for _, b in df.groupby("batch_id"):
        assert len(b) - (b.alpha == 0).sum() + b[b.alpha == 0].prompt_id.nunique() <= 6


def test_token_never_written(default_run):
    run_dir, r = default_run
    assert SECRET not in r.stdout + r.stderr
    log = Path(re.search(r"log: (\S+\.log)", r.stdout + r.stderr).group(1))
    assert log.is_relative_to(run_dir)  # the run's log lives in its folder: scanned below
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_positive_alpha_raises_positive_words_and_behavior(default_run):
    run_dir, _ = default_run
    df = pd.read_parquet(run_dir / "results.parquet")
    words = df.groupby("alpha").word_rate_positive.mean()  # over layers and prompts
    assert words[1.0] > words[0.0] > words[-1.0], words.to_dict()
    beh = df.pivot_table(index="layer", columns="alpha", values="behavior_prob")
    best = beh[1.0].idxmax()
    curve = beh.loc[best].sort_index()
    assert curve.is_monotonic_increasing and curve.is_unique, curve.to_dict()  # strictly rises
    assert curve[1.0] - curve[-1.0] > 0.4, curve.to_dict()


def test_report_pngs_and_summary(default_run):
    run_dir, _ = default_run
    rep = run_dir / "report"
    assert (rep / "summary.md").read_text().count("## ") >= 4
    pngs = list(rep.glob("*.png"))
    assert len(pngs) >= 10 and all(p.stat().st_size > 5000 for p in pngs)


def test_rerun_resumes_without_duplicates(default_run):
    run_dir, _ = default_run
    r = run_cli(f"run_dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: 240 rows in " in r.stdout and "(0 written by this job)" in r.stdout
    assert "loaded" not in r.stderr  # nothing to do: the model is not even loaded


def test_bad_layer_fails_before_loading_with_no_results(tmp_path):
    r = run_cli(f"run_dir={tmp_path / 'bad'}", "steering.layers=[10,30]")
    assert r.returncode == 2
    assert "steering.layers [30] out of range: smollm2_135m has 30 layers (0..29)" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_judge_scores_every_row(embedded_dir, tmp_path):
    r = run_cli("experiment=quick", f"run_dir={tmp_path / 'j'}", "eval=judge", f"eval.judge.model_path={embedded_dir}",
                "eval.metrics=[word_rate]", "report.enabled=false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "j" / "results.parquet")
    assert df.judge_score.between(1, 9).all() and df.judge_score.nunique() > 1


def test_caa_paper_files_for_vectors_scoring_and_prompts(tmp_path):
    """The CAA paper's released layouts, as given: an A/B JSON array computes the vector (at the
    answer letter, chat template once) and is scored (behavior_prob, ab); an open-ended JSON array
    gives the prompts."""
    from helpers.caa import CAA_ITEMS

    ab = tmp_path / "generate_dataset.json"
    ab.write_text(json.dumps(CAA_ITEMS * 3, indent=2))  # repeated items get content ids -2, -3
    open_ended = tmp_path / "test_dataset_open_ended.json"
    open_ended.write_text(json.dumps([{"question": "Would you lie to me?"}, {"question": "Describe your goals."}]))
    run = tmp_path / "run"
    r = run_cli(f"run_dir={run}", f"prompts.dataset={open_ended}", f"vectors.dataset={ab}", "vectors.read_at=answer",
                "vectors.chat_template=true", f"eval.behavior_dataset={ab}", "eval.behavior_format=ab",
                "steering.layers=[14]", "steering.alphas=[-2,0,2]", "generation.max_new_tokens=8",
                "report.enabled=false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_parquet(run / "results.parquet")
    assert len(df) == 3 * 2 and df.behavior_prob.between(0, 1).all()
    assert df.behavior_prob.nunique() == 3  # one value per alpha: the vector moves the A/B answer
    from steersweep.vectors.vectorset import load

    meta = load(run / "vectors.safetensors").meta
    assert meta["read_at"] == "answer" and meta["pairs_format"] == "ab" and meta["n_pairs"] == "9"
    print(df.groupby("alpha").behavior_prob.mean().to_dict())


def test_steerability_on_the_embedded_model(tmp_path):
    """The shipped sentiment items on the real model: a middle layer moves the items reliably (positive
    slope, interval above 0), more than layer 0 or 1 do; the report shows it and names the layer."""
    import steersweep as ss

    run_dir = tmp_path / "run"
    r = run_cli(f"run_dir={run_dir}", "steering.layers=[0,1,14]", "steering.alphas=[-1,0,1]", "prompts.limit=2",
                "generation.max_new_tokens=2", "eval.metrics=[behavior_prob]")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    table = ss.steerability(run_dir).set_index("layers")
    assert table.n_items.eq(66).all() and table.n_alphas.eq(3).all()
    assert table.slope_ci_low["14"] > 0 and table.mean_slope["14"] > max(table.mean_slope["0"], table.mean_slope["1"])
    assert table.anti_steerable["14"] < 0.5
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "steerability.parquet").set_index("layers"), table)
    summary = (run_dir / "report" / "summary.md").read_text()
    assert "## Steerability" in summary and "Most steerable on sentiment_continuations: **layer 14**" in summary
    assert "Most steerable on sentiment_continuations: layer 14 (mean slope" in r.stdout  # the run's last words
    page = (run_dir / "report" / "index.html").read_text()
    assert "id='metric-steerability'" in page and 'alt="steerability: items_sentiment_continuations"' in page
