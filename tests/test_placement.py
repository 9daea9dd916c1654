"""Device-map planning on the meta device from shipped config.json files (no weights, no hub)."""

from __future__ import annotations

import subprocess
import sys

from helpers.checkout import ROOT
from helpers.config import make

from steersweep.pipeline.tasks import plan


def test_llama70b_plan_on_stated_hardware(capsys):
    cfg = make("task=plan", "model=llama70b", "model.path=/nonexistent/llama70b",
               "memory.plan_hardware=[8x80GiB,4x80GiB,2x80GiB,2x48GiB+256GiB]")  # fmt: skip
    plans, said = plan(cfg)
    out = "\n".join(said)
    assert "80 layers" in out
    assert "grid: 16 prompts x 5 layers x 7 alphas = 560 cells" in out  # its own grid: layers 20-48 of 80
    p8, p4, p2, p2small = plans
    # 70.6B bf16 params = 131.4 GiB: fits 2 x 72 GiB (90% of 80), not 2 x 43.2 GiB
    assert p8.fits_on_gpus and p4.fits_on_gpus and p2.fits_on_gpus and not p2small.fits_on_gpus
    for p in plans:
        assert sum(p.layers_per_device.values()) == 80
    assert set(p8.bytes_per_device) == {str(i) for i in range(8)}
    assert p2small.layers_per_device.get("cpu", 0) > 0
    budget = 0.9 * 80 * 2**30
    assert all(b <= budget for d, b in p4.bytes_per_device.items())
    total = sum(p8.bytes_per_device.values())
    assert 130e9 < total < 145e9  # ~70.6B params in bf16


def test_plan_cli_runs_without_weights():
    r = subprocess.run(
        [sys.executable, "run_experiment.py", "task=plan", "model=qwen2_5_7b", "model.path=/nonexistent",
         "memory.plan_hardware=[1x24GiB]"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "28 layers" in r.stdout and "1x24GiB" in r.stdout


def test_plan_names_the_grid_axes_and_their_cells(capsys):
    """task=plan says what the grid is before anything runs: every axis with more than one value."""
    from steersweep.pipeline.tasks import plan

    cfg = make("task=plan", "memory.plan_hardware=[1x24GiB]", "steering.layers=[10,[10,14],all]",
               "vectors.method=[mean_diff,logistic]", "steering.mode=[add,ablate]", "steering.alphas=[0,1]",
               "prompts.limit=3")  # fmt: skip
    assert "grid: 3 prompts x 2 methods x 2 modes x 3 layer sets x 2 alphas = 72 cells" in "\n".join(plan(cfg)[1])
    said = plan(make("task=plan", "memory.plan_hardware=[1x24GiB]", "prompts.limit=3"))[1]
    assert "grid: 3 prompts x 3 layers x 5 alphas = 45 cells" in "\n".join(said)


def test_a_plan_without_a_gpu_says_so():
    """A budget with only the CPU in it (a CPU machine, `task=plan` there): no "spills ... off the GPUs"."""
    import torch

    from steersweep.model.checkpoint import _shipped_config
    from steersweep.model.placement import plan_device_map

    config = _shipped_config(make("model=smollm2_135m").model)
    text = plan_device_map(config, {"cpu": 64 * 2**30}, torch.bfloat16, hardware="CPU").render()
    assert text.startswith("== CPU: no GPU: every layer is placed and runs on the CPU, 2 bytes/param"), text
    assert "GPUs" not in text and "None" not in text, text
