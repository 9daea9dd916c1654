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
from steersweep.cli import precheck
from steersweep.config import register_configs

log = logging.getLogger("steersweep")
register_configs()
CONF = Path(__file__).resolve().parent / "conf"


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
    precheck(sys.argv[1:], CONF)  # one `error:` line for a bad command line or sweep, before Hydra runs
    main()
