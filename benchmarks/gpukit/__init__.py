"""The GPU check kit: the big-model path measured on one offline GPU node in one command.

`make gpu-kit` prepares, under the ignored folder `.gpukit/`, what the node lacks (pure-Python wheels
for Python 3.12 and the embedded model's tokenizer files); `bash benchmarks/gpukit/node.sh OUT` on the
node installs the wheels into a temporary site folder and runs `python -m gpukit --out OUT`: every
check in its own process under its own time limit, one JSON (`OUT/gpukit.json`) and one log
(`OUT/gpukit.log`). `python -m gpukit --dry-run --out DIR` runs the same checks through the same
functions on the CPU with tiny shapes (tests/test_gpukit.py). docs/gpu.md says what the numbers mean.

Checks (models are random, built from the shipped config.json files; no hub, no weights on the node):
- split: a small model in float32, whole on the GPU vs split GPU/CPU by the loader's budget (every
  row equal); bf16 grid vs single-cell agreement; a killed-and-resumed bf16 sweep vs an uninterrupted one;
- throughput: Llama-3-8B held on the GPU: our grid, steering-vectors per setting, per cell, unsteered HF
  `generate`, batch 1 against the bandwidth bound, the grid against its bound, a profile of a step;
- spill70b: Llama-3-70B placed by the planner at 90% of the GPU with the rest on the CPU, grids of
  1 to 256 rows: tok/s, seconds per step, bytes per device, peak GPU memory against the plan;
- load8b: a Llama-3-8B-shaped sharded checkpoint on disk, loaded by the run's loader with a third of
  the layers spilled, then a real sweep through `run_experiment.py` on it.
"""
