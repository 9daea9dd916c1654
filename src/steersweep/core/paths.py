"""Where the package's own files are, and where it keeps what it makes: the same from a source
checkout (`pip install -e .`, `python run_experiment.py`) and from an installed wheel.

- The Hydra configs ship inside the package (`steersweep/conf/`; a checkout's `conf/` links there).
- The embedded model is converted once into a cache folder: `$STEERSWEEP_CACHE`, else a checkout's
  own `.cache/` (where `make setup` puts it), else `$XDG_CACHE_HOME/steersweep` or
  `~/.cache/steersweep`.
- Run folders go under `results_root` relative to the working directory (`plan.folder_for`).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/steersweep
CONF_DIR = PACKAGE_DIR / "conf"  # the primary config folder: config.yaml and the config groups


def source_checkout() -> Path | None:
    """The project folder when the package runs from its source tree (`<root>/src/steersweep`),
    else None (an installed wheel has no checkout, and no commit to record)."""
    root = PACKAGE_DIR.parents[1]
    if PACKAGE_DIR.parent.name == "src" and (root / "pyproject.toml").is_file():
        return root
    return None


def cache_dir() -> Path:
    """Where the embedded model is prepared on first use (see the module docstring for the order)."""
    if os.environ.get("STEERSWEEP_CACHE"):
        return Path(os.environ["STEERSWEEP_CACHE"]).expanduser()
    checkout = source_checkout()
    if checkout is not None:
        return checkout / ".cache"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "steersweep"
