"""Entry point: compose the Hydra config, validate it, run the task, say what went wrong in one line.

python run_experiment.py                                   # default sweep, embedded model
python run_experiment.py model=llama70b                    # 90% of each GPU + CPU spill
python run_experiment.py 'steering.layers=[20,40]' 'steering.alphas=[0,2,4,8]'
python run_experiment.py task=plan model=llama70b          # device maps, no weights loaded
python run_experiment.py task=status run_dir=results/...   # cells done per shard, what is missing
python run_experiment.py task=report run_dir=results/...   # tables, plots, report/index.html
python run_experiment.py --help                            # the config groups and their options

A run's log goes to <run folder>/logs/ (steersweep.runlog); Hydra itself writes no folder of its own
for a plain run (a -m sweep keeps results/.hydra/multirun/, where its launcher logs live).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from steersweep.app import USER_ERRORS, run
from steersweep.cli import precheck
from steersweep.config import register_configs
from steersweep.runlog import RunLog

log = logging.getLogger("steersweep")
register_configs()
CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with RunLog(cfg) as keep:
        try:
            run(cfg)
        except USER_ERRORS as e:
            keep.write(f"error: {e}")  # the run's log only: the console gets it once, below
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        finally:
            if keep.path is not None:
                log.info("log: %s", keep.path)


if __name__ == "__main__":
    precheck(sys.argv[1:], CONF)  # one `error:` line for a bad command line or sweep, before Hydra runs
    main()
