"""The command line as a user meets it (pipeline.cli and the entry point): one `error:` line before Hydra
runs, refused `-m` sweeps before anything is submitted, no folder for a plan or a refusal, --help."""

from __future__ import annotations

import subprocess

import pytest
from helpers.checkout import ROOT, cli


def test_multirun_bad_value_is_one_line_before_anything_is_submitted(tmp_path):
    r = cli("-m", "experiment=quick", "prompts.limit=2,0", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: job 1 (experiment=quick prompts.limit=0 "
        f"hydra.sweep.dir={tmp_path}/sweep): prompts.limit=0 must be >= 1 (or null for every prompt)"
    ]
    assert not (tmp_path / "sweep").exists()  # nothing was launched


def test_multirun_jobs_into_one_folder_refused(tmp_path):
    r = cli("-m", "experiment=quick", "prompts.limit=2,3", f"run_dir={tmp_path / 'one'}")
    assert r.returncode == 2
    assert "error: jobs 0 and 1 of this sweep would write different configs into one folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_multirun_shard_count_auto_refused(tmp_path):
    r = cli("-m", "experiment=quick", "shard_count=auto", "prompts.limit=2,3")
    assert r.returncode == 2
    assert "shard_count=auto in a -m sweep would split every job's grid" in r.stderr


# ---------------------------------------------------------------------------------------------
# Error messages: once, ours, saying what to write


def test_plan_and_refused_input_leave_no_folder(tmp_path):
    root = tmp_path / "results"
    assert cli("task=plan", f"results_root={root}", cwd=tmp_path).returncode == 0
    bad = cli("steering.layers=[99]", f"results_root={root}", cwd=tmp_path)
    assert bad.returncode == 2
    assert not root.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_error_is_printed_once(tmp_path):
    r = cli("steering.layers=[99]", f"results_root={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: steering.layers [99] out of range: smollm2_135m has 30 layers (0..29): change steering.layers"
    ]
    assert "out of range" not in r.stdout


@pytest.mark.parametrize(
    "override, want",
    [
        ("steering.layers=12.5", "steering.layers takes whole numbers, not 12.5: write steering.layers=[12]"),
        ("steering.layers=[12.5]", "steering.layers takes whole numbers, not 12.5: write steering.layers=[12]"),
        ("steering.layers=[[10,12.5]]", "steering.layers takes whole numbers, not 12.5: write steering.layers=[12]"),
        ("steering.alphas=2", "steering.alphas=2: steering.alphas takes a list: write steering.alphas=[2]"),
    ],
)  # fmt: skip
def test_layers_scalar_says_what_to_write(override, want, tmp_path):
    r = cli(override, f"results_root={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {want}"]


def test_misspelt_key_still_lists_the_valid_keys(tmp_path):
    r = cli("steering.layerz=[1]", cwd=tmp_path)
    assert r.returncode == 2 and "valid keys: layers, alphas" in r.stderr


def test_readme_documents_the_exchange_and_help():
    readme = (ROOT / "README.md").read_text()
    assert (
        "python -m steersweep.vectors.exchange export" in readme
        and "python -m steersweep.vectors.exchange import" in readme
    )
    assert "python run_experiment.py --help" in readme and "report/index.html" in readme
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "task=plan" in out and "task=status" in out and "task=report" in out and "--help" in out


def test_help_lists_tasks_and_groups(tmp_path):
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    for want in ("task=", "plan", "status", "report", "== Configuration groups", "model: ", "smollm2_135m", "eval: "):
        assert want in r.stdout, want
    assert list(tmp_path.iterdir()) == []
