"""steerbench: throughput of steered generation against the alternatives, and the issue's targets.

    PYTHONPATH=benchmarks .venv/bin/python -m steerbench [--prompts 8] [--tokens 64] ...   (= make bench)

Modules: workload (cells, prompts, vectors), machine (GEMM peak, bandwidth, RSS), methods/ (one
module per method: seed_loop, per_cell, per_setting = the steering-vectors library, grid, static),
profile (torch.profiler of one decoding step), report (targets and the printed table). See
benchmarks/README.md.
"""
