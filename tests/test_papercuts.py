"""Small things a newcomer trips on (issue 12, items 4 and 5): each checked through the real entry point
or the real writer, as a user meets it."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_checkpoint

from steersweep.core import errors
from steersweep.vectors import vectorset


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "run_experiment.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def umask_mode() -> int:
    old = os.umask(0)
    os.umask(old)
    return 0o666 & ~old


@pytest.fixture(scope="module")
def tiny_cli_run(tmp_path_factory, embedded_dir):
    """`python run_experiment.py` on a tiny random Llama (embedded tokenizer), from a clean folder."""
    tmp = tmp_path_factory.mktemp("papercuts")
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


# ---------------------------------------------------------------------------------------------
# Hydra folders, logs, the watchdog line, file modes


def test_run_keeps_its_log_in_the_run_folder_and_hydra_makes_no_folder(tiny_cli_run):
    r, run, tmp = tiny_cli_run
    assert run.name.startswith("tiny-")
    assert sorted(p.name for p in (tmp / "results").iterdir()) == [run.name]  # no results/.hydra
    assert list((tmp / "cwd").iterdir()) == []  # nor anything in the working directory
    (log,) = (run / "logs").glob("*.log")
    text = log.read_text()
    assert text.startswith("# python ") and "run_name=tiny" in text.splitlines()[0]
    assert "done: " in r.stdout


def test_plan_and_refused_input_leave_no_folder(tmp_path):
    root = tmp_path / "results"
    assert cli("task=plan", f"results_root={root}", cwd=tmp_path).returncode == 0
    bad = cli("steering.layers=[99]", f"results_root={root}", cwd=tmp_path)
    assert bad.returncode == 2
    assert not root.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_no_watchdog_line_unless_the_limit_was_chosen(tiny_cli_run, capfd):
    from steersweep.core.runtime import watchdog

    r, _, _ = tiny_cli_run
    assert "[watchdog]" not in r.stderr + r.stdout  # the default 3600 s load limit is not news
    with watchdog(3600.0, "loading x"):
        pass
    assert "[watchdog]" not in capfd.readouterr().err
    with watchdog(600.0, "loading x"):  # memory.load_timeout_s=600: said once
        pass
    assert capfd.readouterr().err.count("[watchdog] loading x:") == 1


def test_vectors_file_follows_the_umask_like_the_rest(tiny_cli_run):
    _, run, _ = tiny_cli_run
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (run / "vectors.safetensors", run / "manifest.json")}
    assert modes == {"vectors.safetensors": umask_mode(), "manifest.json": umask_mode()}


def test_atomic_writer_applies_the_umask_to_private_writers(tmp_path):
    from safetensors.torch import save_file

    from steersweep.core.fileio import atomic_write_bytes

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "v.safetensors", lambda t: save_file({"a": torch.zeros(2)}, str(t)))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "v.safetensors").stat().st_mode) == 0o640


def test_embedded_checkpoint_left_private_by_an_older_conversion_is_made_readable(tmp_path):
    from steersweep.model.embedded import STAMP, prepare

    done = tmp_path / "model"
    done.mkdir()
    (done / STAMP).write_text("{}")
    for name, mode in (("model-00001-of-00003.safetensors", 0o600), ("config.json", 0o644), ("mine.txt", 0o640)):
        (done / name).write_bytes(b"x")
        (done / name).chmod(mode)
    old = os.umask(0o022)
    try:
        assert prepare(done) == done
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in done.iterdir() if p.name != STAMP}
    # safetensors' 0600 becomes what open() makes; a mode someone chose on purpose is kept
    assert modes == {"model-00001-of-00003.safetensors": 0o644, "config.json": 0o644, "mine.txt": 0o640}


@pytest.mark.slow
def test_embedded_conversion_writes_shards_others_can_read(tmp_path):
    from steersweep.model.embedded import prepare

    old = os.umask(0o027)
    try:
        out = prepare(tmp_path / "model")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len([n for n in modes if n.endswith(".safetensors")]) == 3
    assert set(modes.values()) == {0o640}, modes  # the umask's mode, not safetensors' private 0600


# ---------------------------------------------------------------------------------------------
# Error messages: once, ours, saying what to write


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


def test_pickle_refusal_is_ours(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"layer.1": Evil()}, tmp_path / "v.pt")
    with pytest.raises(errors.VectorError) as e:
        vectorset.load(tmp_path / "v.pt")
    msg = str(e.value)
    assert "\n" not in msg and "False" not in msg and "trusted source" not in msg, msg
    assert re.fullmatch(
        r"refused to load .*v\.pt with weights_only=True \(it pickles Python objects, not only tensors: \S*system\); "
        r"save plain tensors in a dict or use safetensors",
        msg,
    ), msg


# ---------------------------------------------------------------------------------------------
# GGUF exchange, the report's interval note, help


def test_gguf_round_trip_keeps_concept_norms_and_ids(tmp_path):
    vs = vectorset.VectorSet(
        {3: torch.randn(32), 7: torch.randn(32)}, "joy", {"model": "tiny", "method": "pca_diff"}, {3: 1.5, 7: 2.25}
    )
    vectorset.save(vs, tmp_path / "v.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for args in (["export", "v.safetensors", "some name.gguf"], ["import", "some name.gguf", "back.safetensors"]):
        r = subprocess.run([sys.executable, "-m", "steersweep.vectors.exchange", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
    for path in (tmp_path / "some name.gguf", tmp_path / "back.safetensors"):
        back = vectorset.load(path)
        assert back.concept == "joy" and back.resid_norms == {3: 1.5, 7: 2.25} and back.method == "pca_diff"
        assert [back.vector_id(k) for k in (3, 7)] == [vs.vector_id(3), vs.vector_id(7)]
        assert back.meta["model"] == "tiny"


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


def test_behavior_prob_interval_is_across_items(tmp_path):
    from steersweep.reporting.write import write_report
    from steersweep.runs.folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.create()
    rows = [
        {"run_id": "r", "cell_id": f"c{a}{p}", "model": "toy", "layer": 1, "alpha": a, "prompt_id": f"p{p}",
         "prompt": "x", "completion": "y", "behavior_prob": 0.5 + a / 10, "behavior_prob_sem": 0.01,
         "perplexity": 3.0 + p}
        for a in (0.0, 1.0) for p in range(2)
    ]  # fmt: skip
    folder.write_part(rows, "w")
    folder.merge()
    summary = write_report(folder.path).read_text()
    beh = summary.split("## behavior_prob")[1].split("##")[0]
    ppl = summary.split("## perplexity")[1].split("##")[0]
    assert "interval across behaviour items" in beh and "across prompts" not in beh
    assert "interval across prompts" in ppl
    page = (folder.path / "report" / "index.html").read_text()
    assert "Mean ± 95% interval across behaviour items" in page
