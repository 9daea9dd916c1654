"""Entry point: compose the Hydra config, validate it, run the task, always say where output went.

python run_experiment.py                                   # default sweep, embedded model
python run_experiment.py model=llama70b                    # 90% of each GPU + CPU spill
python run_experiment.py 'steering.layers=[20,40]' 'steering.alphas=[0,2,4,8]'
python run_experiment.py task=plan model=llama70b          # device maps, no weights loaded
python run_experiment.py task=report run_dir=results/...   # tables and plots
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from steersweep.app import USER_ERRORS, run
from steersweep.config import register_configs

log = logging.getLogger("steersweep")
register_configs()
CONF = Path(__file__).resolve().parent / "conf"


def precheck(overrides: list[str]) -> None:
    """Compose once before Hydra runs, so a typo or a wrong type is one clear line and exit 2.

    Only plain `key=value` lists: multirun sweeps and Hydra flags (-m, --cfg, --help) keep Hydra's
    own handling.
    """
    if any(a.startswith("-") for a in overrides):
        return
    from dataclasses import fields, is_dataclass

    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    except (ConfigCompositionException, HydraException) as e:
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        msg = lines[0]
        if e.__cause__ is not None:
            msg += " " + str(e.__cause__).strip().splitlines()[0]
            typ = getattr(e.__cause__, "object_type", None)
            if is_dataclass(typ):
                msg += f"; valid keys: {', '.join(f.name for f in fields(typ))}"
        elif any(x.startswith("Available options") for x in lines):  # a group option that does not exist
            i = next(i for i, x in enumerate(lines) if x.startswith("Available options"))
            opts = [x for x in lines[i + 1 :] if "=" not in x and not x.startswith("Config search path")]
            msg += "; available: " + ", ".join(opts)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        log.info("hydra output dir: %s", HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
