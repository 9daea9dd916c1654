"""Real Slurm (slurm/local/up.sh): under `--mem`, the CPU budget that `task=plan` prints stays below
the job's limit and names it, instead of following the node's /proc/meminfo past it."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
GiB = 2**30


def sh(*cmd: str, timeout: int = 60, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}")
    return r


@pytest.fixture(scope="module")
def cluster():
    # Another session may be (re)starting the shared cluster: up.sh is idempotent, so bring it up
    # whenever sinfo cannot answer, a few times.
    for _ in range(3):
        try:
            if sh("sinfo", check=False, timeout=30).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            pass
        sh("bash", "slurm/local/up.sh", timeout=300, check=False)
        time.sleep(2)
    sh("sinfo", timeout=30)


def test_plan_cpu_budget_below_mem_limit(cluster, tmp_path):
    out = tmp_path / "out.txt"
    python, script = ROOT / ".venv" / "bin" / "python", ROOT / "run_experiment.py"
    sh("sbatch", "--wait", "--partition=debug", "--gpus-per-node=0", "--mem=3G", "--cpus-per-task=1",
       f"--output={out}", "--wrap", f"'{python}' '{script}' task=plan 'memory.plan_hardware=[1x24GiB]'",
       timeout=600)  # fmt: skip
    text = out.read_text()
    m = re.search(r"^CPU budget here: ([0-9.]+) GiB \((.*)\)$", text, re.M)
    assert m, text[-3000:]
    print(m.group(0))
    assert float(m.group(1)) * GiB < 3 * GiB
    # The local cluster runs task/none (no cgroups), so Slurm's own variable is the limit that applies.
    assert "job limit 3.00 GiB from SLURM_MEM_PER_NODE=3072 MB" in m.group(2), m.group(0)
