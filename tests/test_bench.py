"""`make bench` (benchmarks/steerbench) end to end on a tiny random Llama: every target reported.

The speeds of a tiny model on a shared machine mean nothing, so only the structure is checked here,
plus what must hold on any machine: float32 tokens equal between grid, per-cell and the
steering-vectors library per setting, and every method making exactly T tokens per row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.checkout import ROOT
from helpers.models import tiny_llama

sys.path.insert(0, str(ROOT / "benchmarks"))
from steerbench.report import TARGETS, agreement  # noqa: E402
from steerbench.workload import Method  # noqa: E402

ARGS = ["--prompts", "2", "--alphas", "0", "4", "--layers", "1", "2", "--tokens", "4", "--seed-cells", "1",
        "--eos-prompts", "2", "--eos-tokens", "6"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 4-layer random Llama with the embedded model's real tokenizer, saved as a checkpoint."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(out)
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(out)
    return out


def bench(model_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "steerbench", "--model", str(model_dir), "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bench_reports_every_target(tiny_dir, tmp_path, dtype):
    r = bench(tiny_dir, tmp_path / "bench.json", *ARGS, "--dtype", dtype)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "bench.json").read_text())

    # Every CPU target, measured, with its threshold and a verdict; the printed table shows each.
    assert [t["target"] for t in res["targets"]] == [k for k, *_ in TARGETS]
    for t in res["targets"]:
        assert isinstance(t["measured"], float) and t["met"] in (True, False), t
        assert t["what"] in r.stdout
    # A missed target comes with the profile of a decoding step.
    if any(t["met"] is False for t in res["targets"]):
        assert res["profile"]["grid_step"]["top_ops"] and "profile (grid_step)" in r.stdout

    # The methods ran the whole workload: 2 prompts x 2 alphas x 2 layers, T = 4 tokens each.
    main = res["main"]["methods"]
    assert set(main) == {"seed_loop", "per_cell", "per_setting", "grid"}
    assert main["per_setting"]["impl"].startswith("steering-vectors 0.12.2")
    for k in ("per_cell", "per_setting", "grid"):
        assert (main[k]["rows"], main[k]["tokens"]) == (8, 32), k
    assert set(res["eos"]["methods"]) == {"static", "loop"}
    assert res["eos"]["methods"]["loop"]["rows"] == 2 * 2 * 2

    # float32 tokens equal between grid, per-cell and per-setting (3 pairs of rows compared).
    f32 = res["float32_check"]
    assert f32["rows_compared"] > 0 and f32["rows_equal"] == f32["rows_compared"], f32
    target = next(t for t in res["targets"] if t["target"] == "float32_tokens_equal")
    assert target["met"] is True
    assert ("main run" in f32["source"]) == (dtype == "float32")
    assert res["dtype"]["used"] == dtype


def test_token_agreement_sees_one_differing_token():
    """The equality check can fail: one token changed in one row of one method is reported."""
    a, b, c = (Method(n, "") for n in ("grid", "per_cell", "per_setting"))
    for m in (a, b, c):
        m.add([0, 1], [[5, 6, 7], [8, 9, 10]], 1.0)
    c.out[1] = [8, 9, 11]
    detail, same, total, firsts = agreement([a, b, c])
    assert detail == {
        "grid==per_cell": "2/2 rows",
        "grid==per_setting": "1/2 rows",
        "per_cell==per_setting": "1/2 rows",
    }
    assert (same, total) == (4, 6)
    assert firsts == [
        "cell 1: grid and per_setting differ from token 2",
        "cell 1: per_cell and per_setting differ from token 2",
    ]


def test_bad_layer_fails_before_loading(tiny_dir, tmp_path):
    r = bench(tiny_dir, tmp_path / "b.json", "--layers", "7")
    assert r.returncode != 0
    assert "--layers [7] out of range: the model has 4 layers" in r.stderr
    assert not (tmp_path / "b.json").exists()
