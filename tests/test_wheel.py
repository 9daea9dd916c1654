"""The package as a user gets it: a wheel built from this tree, installed (not editable) into a fresh
virtual environment, run from an empty folder. The console script, `python -m steersweep`, a user's
own `--config-dir` and the README's python-api block (on a few rows of the embedded model) must work
there: the configs, datasets and assets come from the installed package, run folders go under the
working directory's ./results, and provenance names the installed version.

The fresh environment gets this environment's dependencies through a .pth file naming their
site-packages folder. Python adds that folder to sys.path but does not read the .pth files inside it,
so the editable install of the checkout (`__editable__.steersweep-*.pth`) stays out: checked below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from helpers.checkout import ROOT, readme_block

pytestmark = pytest.mark.slow

# the README's grid (2 layers x 2 alphas) on 2 prompts, 4 tokens: 8 rows
QUICK = ["prompts.limit=2", "generation.max_new_tokens=4", "eval.behavior_limit=4", "report.enabled=false",
         "progress=false"]  # fmt: skip

RUN_README = """
import json, sys
import steersweep as ss

block = open(sys.argv[1]).read()
compose = ss.Sweep.compose.__func__


def quick(cls, model=None, overrides=(), **kw):  # the README's call, its grid cut to a few rows
    return compose(cls, model, [*overrides, *sys.argv[2:]], **kw)


ss.Sweep.compose = classmethod(quick)
ns = {}
exec(compile(block, "README.md", "exec"), ns)
print("RESULT " + json.dumps({"file": ss.__file__, "run_dir": str(ns["run"].run_dir), "rows": len(ns["df"]),
                              "sys_path": sys.path}))
"""


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: {r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory, embedded_dir) -> SimpleNamespace:
    """The wheel built from a copy of the tree (a build in the checkout would leave build/ there),
    installed with --no-deps into a fresh venv; an empty working folder; the environment to run in."""
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "tree"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    local = tree / "src" / "steersweep" / "conf" / "local"  # a machine's own paths: never in a wheel
    local.mkdir(exist_ok=True)
    (local / "default.yaml").write_text("# mine\n")
    dist, venv = tmp / "dist", tmp / "venv"
    # no PYTHONPATH: a checkout's src/ on it would look to pip like steersweep already installed
    here = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run([sys.executable, "-m", "pip", "wheel", tree, "--no-deps", "--no-build-isolation", "-w", dist, "-q"], tmp, here)
    (wheel,) = dist.glob("steersweep-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, here)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], tmp, here)
    # after the install, so pip never sees the checkout's editable steersweep beside the new one
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, here).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "steersweep_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    env = dict(
        here,
        PATH=f"{venv / 'bin'}{os.pathsep}{here.get('PATH', '')}",
        STEERSWEEP_CACHE=str(embedded_dir.parent),  # the model `make setup` converted: no conversion here
        HF_HUB_OFFLINE="1",
    )
    cwd = tmp / "work"
    cwd.mkdir()
    return SimpleNamespace(wheel=wheel, venv=venv, python=python, env=env, cwd=cwd, tmp=tmp, deps=sorted(deps))


def test_the_wheel_holds_the_configs_and_data_but_no_local_paths(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for f in ("conf/config.yaml", "conf/experiment/quick.yaml", "conf/hydra/help/steersweep.yaml",
              "conf/hydra/launcher/slurm_8gpu.yaml", "datasets/prompts_default.jsonl",
              "model_configs/smollm2_135m_instruct.json", "assets/report.js", "__main__.py"):  # fmt: skip
        assert f"steersweep/{f}" in names, f
    assert not [n for n in names if "/local/" in n]
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    assert "steersweep = steersweep.__main__:main" in zipfile.ZipFile(installed.wheel).read(ep).decode()


def test_the_console_script_and_python_m_run_from_an_empty_folder(installed):
    r = run(["steersweep", "task=plan"], installed.cwd, installed.env)
    assert "model smollm2_135m: 30 layers" in r.stdout and "its tokenizer" in r.stdout  # the cached model's
    r = run([installed.python, "-m", "steersweep", "task=plan", "model=llama70b"], installed.cwd, installed.env)
    assert "model llama70b: 80 layers" in r.stdout and "560 cells" in r.stdout
    bad = subprocess.run(["steersweep", "steering.layerz=[1]"], cwd=installed.cwd, env=installed.env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: Could not override 'steering.layerz'")
    assert list(installed.cwd.iterdir()) == []  # a plan and a refusal write nothing


def test_a_users_config_dir_adds_an_experiment(installed):
    mine = installed.tmp / "my conf"
    (mine / "experiment").mkdir(parents=True)
    (mine / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: llama8b\nsteering:\n  layers: [3, 7]\n"
    )
    r = run(["steersweep", "--config-dir", mine, "experiment=mine", "task=plan"], installed.cwd, installed.env)
    assert "model llama8b: 32 layers" in r.stdout and "layers [3, 7] (steering.layers)" in r.stdout


def test_the_readme_python_api_block_runs_a_sweep_into_dot_results(installed):
    script, block = installed.tmp / "run_readme.py", installed.tmp / "block.py"
    script.write_text(RUN_README)
    block.write_text(readme_block("python-api"))
    r = run([installed.python, script, block, *QUICK], installed.cwd, installed.env, timeout=600)
    got = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert Path(got["file"]).is_relative_to(installed.venv)  # the wheel's copy, not the checkout's
    editable = [  # the paths the editable install's .pth files would add, had they been read
        line.strip() for d in installed.deps for pth in Path(d).glob("__editable__*.pth")
        for line in pth.read_text().splitlines() if line.strip() and not line.startswith("import ")
    ]  # fmt: skip
    assert not {str(ROOT / "src"), *editable} & set(got["sys_path"]), got["sys_path"]
    run_dir = Path(got["run_dir"])
    assert run_dir.parent == installed.cwd / "results" and [p.name for p in installed.cwd.iterdir()] == ["results"]
    df = pd.read_parquet(run_dir / "results.parquet")
    assert len(df) == got["rows"] == 2 * 2 * 2  # prompts x layers [10, 14] x alphas [0, 2]
    assert sorted(set(df.layer)) == [10, 14] and sorted(set(df.alpha)) == [0.0, 2.0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["git_commit"] is None and manifest["packages"]["steersweep"] == "0.1.0"
    assert Path(manifest["load"]["path"]) == Path(installed.env["STEERSWEEP_CACHE"]) / "smollm2-135m-instruct"
    assert (run_dir / "report" / "summary.md").is_file()  # ss.report(df).show(): the shipped assets
