"""The checkout the tests run in: its root, the README's example blocks, and its command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def readme_block(name: str) -> str:
    """The fenced python block after `<!-- readme-example: NAME ... -->` in README.md."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- readme-example: " + re.escape(name) + r"(?:\s[^>]*)?-->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no block marked readme-example: {name}"
    return m.group(1)


def cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python run_experiment.py ARGS` from `cwd`, as a user types it (outside any Slurm job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_experiment.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
