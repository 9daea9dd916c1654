"""Entry point in a checkout: `python run_experiment.py ARGS` is `steersweep ARGS` (the console
script an install gives) and `python -m steersweep ARGS`; see steersweep/__main__.py.

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

from steersweep.__main__ import main

if __name__ == "__main__":
    main()
