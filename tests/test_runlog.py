"""The run's log (pipeline.runlog): kept inside the run folder, with no Hydra folder per call."""

from __future__ import annotations


def test_run_keeps_its_log_in_the_run_folder_and_hydra_makes_no_folder(tiny_cli_run):
    r, run, tmp = tiny_cli_run
    assert run.name.startswith("tiny-")
    assert sorted(p.name for p in (tmp / "results").iterdir()) == [run.name]  # no results/.hydra
    assert list((tmp / "cwd").iterdir()) == []  # nor anything in the working directory
    (log,) = (run / "logs").glob("*.log")
    text = log.read_text()
    assert text.startswith("# python ") and "run_name=tiny" in text.splitlines()[0]
    assert "done: " in r.stdout
