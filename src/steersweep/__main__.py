"""The command line: `steersweep ARGS`, `python -m steersweep ARGS` and, in a checkout,
`python run_experiment.py ARGS` all run `main()` with the same Hydra overrides.

steersweep                                   # default sweep, embedded model, rows under ./results/
steersweep model=llama70b                    # 90% of each GPU + CPU spill
steersweep 'steering.layers=[20,40]' 'steering.alphas=[0,2,4,8]'
steersweep task=plan model=llama70b          # device maps, no weights read
steersweep task=status run_dir=results/...   # cells done per shard, what is missing
steersweep task=report run_dir=results/...   # tables, plots, report/index.html
steersweep --config-dir ~/my_conf experiment=mine  # your own config files beside the shipped ones
steersweep --help                            # the config groups and their options

The configs ship inside the package (`steersweep/conf/`, `steersweep.paths.CONF_DIR`). A run's log
goes to <run folder>/logs/ (steersweep.runlog); Hydra itself writes no folder of its own for a plain
run (a -m sweep keeps results/.hydra/multirun/, where its launcher logs live).
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from steersweep.core.config import register_configs
from steersweep.core.errors import USER_ERRORS
from steersweep.core.paths import CONF_DIR
from steersweep.pipeline.cli import precheck
from steersweep.pipeline.runlog import RunLog
from steersweep.pipeline.tasks import run

log = logging.getLogger("steersweep")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _run(cfg: DictConfig) -> None:
    with RunLog(cfg) as keep:
        try:
            for line in run(cfg).said:  # the library returns values; the command line says them
                print(line)
        except USER_ERRORS as e:
            keep.write(f"error: {e}")  # the run's log only: the console gets it once, below
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        finally:
            if keep.path is not None:
                log.info("log: %s", keep.path)


def main() -> None:
    """Check the command line (one `error:` line and exit 2 if it cannot run), then run it with Hydra."""
    register_configs()
    precheck(sys.argv[1:], CONF_DIR)  # before Hydra runs: a bad command line or sweep is one line
    _run()


if __name__ == "__main__":
    main()
