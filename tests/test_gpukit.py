"""The GPU check kit's CPU dry run (benchmarks/gpukit): the same script, checks and JSON writer the GPU
node runs, with tiny shapes, so that device time is spent measuring, not debugging.

The dry run goes through the run's loader (a CPU/disk split standing in for GPU/CPU), the planner,
`generate_rows`, steerbench's methods (the steering-vectors library included), `run_experiment.py`
sweeps (one killed with SIGKILL and resumed) and the orchestrator's per-check limits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from helpers.checkout import ROOT

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])}


def gpukit(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def kit(tmp_path_factory, embedded_dir):
    kit = tmp_path_factory.mktemp("kit")
    r = gpukit("gpukit.prepare", "--no-wheels", "--kit", str(kit))
    assert r.returncode == 0, r.stderr[-3000:]
    return kit


@pytest.fixture(scope="module")
def dry(kit, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    r = gpukit("gpukit", "--dry-run", "--out", str(out), "--kit", str(kit))
    assert r.returncode == 0, r.stderr[-3000:] + (out / "gpukit.log").read_text()[-5000:]
    return json.loads((out / "gpukit.json").read_text()), r.stdout, out


def test_every_check_runs_and_the_json_holds_every_target(dry):
    doc, stdout, out = dry
    log = (out / "gpukit.log").read_text()
    assert {n: s["status"] for n, s in doc["steps"].items()} == dict.fromkeys(
        ("split", "throughput", "spill70b", "load8b"), "ok"
    ), log[-5000:]
    assert doc["device"] == "cpu (dry run)" and doc["scale"] == "dry" and doc["versions"]["transformers"]
    assert set(doc["targets"]) == {
        "8b_batch1_fraction_of_hbm_bound", "8b_grid96_fraction_of_bound", "8b_grid96_vs_steering_vectors_per_setting",
        "8b_grid96_vs_unsteered_hf_generate", "70b_spill_grid256_vs_batch1_tok_s", "70b_spill_peak_gpu_over_planned",
        "float32_split_rows_unequal",
    }  # fmt: skip
    for t in doc["targets"].values():
        assert set(t) >= {"measured", "threshold", "met"} and isinstance(t["met"], bool)
    assert "target" in stdout and "gpukit.json" in stdout  # the table the device call's output tail shows


def test_split_steers_exactly_and_a_killed_sweep_resumes_row_for_row(dry):
    r = dry[0]["steps"]["split"]["result"]
    s = r["split"]
    assert s["rows"] > 0 and s["equal_rows"] == s["rows"] and s["steering_changed_rows"] > 0
    assert set(s["layers_per_device"]) == {"cpu", "disk"}  # the dry run's stand-in for GPU + CPU
    assert dry[0]["targets"]["float32_split_rows_unequal"] == {
        "measured": 0.0, "threshold": 0, "met": True, "check": "split", "direction": "<="}  # fmt: skip
    res = r["bf16_resume"]
    assert res["killed_by_sigkill"] and res["parts_at_kill"] >= 1
    assert res["rows"] == res["rows_resumed"] == res["unique_cells_resumed"] == res["equal_rows"] > 0, res
    assert r["bf16_agreement"]["cells"] > 0


def test_throughput_times_every_method_on_the_same_workload(dry):
    r = dry[0]["steps"]["throughput"]["result"]
    for m in ("grid", "per_setting", "per_cell"):
        assert r[m]["tokens"] > 0 and r[m]["tok_per_s"] > 0, m
    assert r["grid"]["rows"] == r["rows"] and r["grid"]["tokens"] == r["rows"] * r["tokens_per_row"]  # EOS masked
    assert r["hf_generate"]["tokens"] == r["rows"] * r["tokens_per_row"]
    assert 0 < r["batch1"]["fraction_of_bandwidth_bound"]
    for prof in (r["profile_grid_step"], r["profile_batch1_step"]):
        assert prof["top_ops"] and 0 < prof["kernel_share"] <= 1 and prof["gap_share"] >= 0


def test_spill_and_load_go_through_the_planner_loader_and_a_real_sweep(dry):
    steps = dry[0]["steps"]
    sp = steps["spill70b"]["result"]
    assert [g["rows"] for g in sp["grids"]] == [1, 4] and all(g["tokens"] == g["rows"] * 4 for g in sp["grids"])
    assert sp["plan"]["layers_per_device"] == {"cpu": 8} and sp["plan"]["render"].startswith("== CPU: no GPU")
    ld = steps["load8b"]["result"]
    assert ld["sweep_exit_code"] == 0 and ld["rows_written"] == ld["rows_expected"] == 8
    assert ld["shards"] >= 1 and ld["layers_per_device"] == {"cpu": 6} and ld["offload_state_dict"] is False


def test_a_hung_check_is_killed_at_its_limit_and_the_run_goes_on(kit, tmp_path):
    """The load stalls (a fault point inside the loader's watchdog): the orchestrator's limit ends that
    check (SIGTERM, then SIGKILL to its process group), records "timeout" with the partial results, and
    still writes the JSON with every target."""
    out = tmp_path / "out"
    env = {**ENV, "STEERSWEEP_FAULT_STALL_LOAD": "600"}
    r = subprocess.run(
        [sys.executable, "-m", "gpukit", "--dry-run", "--out", str(out), "--kit", str(kit), "--only", "load8b",
         "spill70b", "--budget-s", "120", "--limit-s", "40"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "gpukit.json").read_text())
    hung = doc["steps"]["load8b"]
    assert hung["status"] == "timeout" and hung["wall_s"] < 60
    # SIGTERM first: the check wrote what it had measured before the load hung
    assert "TimeoutError" in hung["error"] and hung["partial"]["checkpoint_bytes"] > 0, hung
    assert doc["steps"]["spill70b"]["status"] == "ok"  # the next check ran
    assert doc["targets"]["float32_split_rows_unequal"]["met"] is False  # not run: listed, not met


def test_no_gpu_and_no_kit_are_one_line_refusals(tmp_path):
    r = gpukit("gpukit", "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: no CUDA device"), r.stderr
    r = gpukit("gpukit", "--dry-run", "--out", str(tmp_path / "o"), "--kit", str(tmp_path / "nokit"), timeout=120)
    assert r.returncode == 2 and "run `make gpu-kit` first" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_prepare_refuses_a_wheel_whose_requirement_the_node_lacks(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpukit.prepare import check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name, reqs in (("good", ["PyYAML>=5.1", "omegaconf (>=2.2)"]),
                       ("bad", ["kernels>=0.19.1", "numpy; extra == 'dev'", "typing; python_version < '3.5'",
                               "antlr4-python3-runtime==4.9.*"])):  # fmt: skip
        with zipfile.ZipFile(tmp_path / f"{name}-1.0-py3-none-any.whl", "w") as z:
            meta = "Name: x\n" + "".join(f"Requires-Dist: {r}\n" for r in reqs)
            z.writestr(f"{name}-1.0.dist-info/METADATA", meta)
    with zipfile.ZipFile(tmp_path / "omegaconf-2.3.1-py3-none-any.whl", "w") as z:
        z.writestr("omegaconf-2.3.1.dist-info/METADATA", "Name: omegaconf\n")
    assert check(tmp_path) == [
        "bad-1.0-py3-none-any.whl needs kernels",
        "bad-1.0-py3-none-any.whl needs antlr4-python3-runtime",
    ]
