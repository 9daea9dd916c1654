"""runtime.memory_limit and cpu_budget on fake /proc and cgroup trees (no model, no cluster)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from steersweep.core.runtime import cpu_budget, memory_limit
from steersweep.model import placement as loading

GiB = 2**30
V1_UNLIMITED = "9223372036854771712"


def fake_proc(tmp: Path, cgroup: str, rss_kib: int = 512 * 1024, avail_kib: int = 64 * 1024 * 1024) -> Path:
    proc = tmp / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "status").write_text(f"Name:\tpython\nVmRSS:\t{rss_kib} kB\n")
    (proc / "meminfo").write_text(f"MemTotal: {2 * avail_kib} kB\nMemAvailable: {avail_kib} kB\n")
    return proc


def v2_tree(tmp: Path, limits: dict[str, str], unified: bool = False) -> Path:
    """cgroup v2 mount with memory.max per folder ("" = root, which has none)."""
    root = tmp / "cgroup"
    mount = root / "unified" if unified else root
    mount.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpu memory pids\n")
    for rel, value in limits.items():
        d = mount / rel
        d.mkdir(parents=True, exist_ok=True)
        if rel:
            (d / "memory.max").write_text(value + "\n")
    return root


def v1_tree(tmp: Path, limits: dict[str, str]) -> Path:
    root = tmp / "cgroup"
    for rel, value in limits.items():
        d = root / "memory" / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(value + "\n")
    return root


JOB = "system.slice/slurmstepd.scope/job_7"
V2_CGROUP = f"0::/{JOB}/step_batch/user/task_0\n"


def test_cgroup_v2_tightest_ancestor_wins(tmp_path):
    proc = fake_proc(tmp_path, V2_CGROUP)
    root = v2_tree(tmp_path, {"": "", JOB: str(3 * GiB), f"{JOB}/step_batch": "max",
                              f"{JOB}/step_batch/user/task_0": "max"})  # fmt: skip
    limit, source = memory_limit(proc, root, environ={})
    assert limit == 3 * GiB
    assert source == f"cgroup v2 memory.max of /{JOB}"


def test_cgroup_v2_max_everywhere_is_no_limit(tmp_path):
    proc = fake_proc(tmp_path, V2_CGROUP)
    root = v2_tree(tmp_path, {"": "", JOB: "max", f"{JOB}/step_batch/user/task_0": "max"})
    limit, why = memory_limit(proc, root, environ={})
    assert limit is None
    assert "no job memory limit" in why and "memory.max: max" in why


def test_cgroup_v2_hybrid_mount_under_unified(tmp_path):
    proc = fake_proc(tmp_path, "1:memory:/\n" + V2_CGROUP)
    root = v2_tree(tmp_path, {"": "", JOB: str(2 * GiB)}, unified=True)
    assert memory_limit(proc, root, environ={})[0] == 2 * GiB


def test_cgroup_v1_limit_and_unlimited(tmp_path):
    proc = fake_proc(tmp_path, "5:cpu,cpuacct:/slurm/uid_0/job_9\n4:memory:/slurm/uid_0/job_9/step_0\n")
    root = v1_tree(tmp_path, {"": V1_UNLIMITED, "slurm": V1_UNLIMITED, "slurm/uid_0/job_9": str(5 * GiB),
                              "slurm/uid_0/job_9/step_0": V1_UNLIMITED})  # fmt: skip
    limit, source = memory_limit(proc, root, environ={})
    assert limit == 5 * GiB
    assert source == "cgroup v1 memory.limit_in_bytes of /slurm/uid_0/job_9"

    (root / "memory" / "slurm/uid_0/job_9" / "memory.limit_in_bytes").write_text(V1_UNLIMITED)
    limit, why = memory_limit(proc, root, environ={})
    assert limit is None and "cgroup v1 memory: unlimited" in why


def test_no_cgroups_no_slurm(tmp_path):
    proc = fake_proc(tmp_path, "")
    limit, why = memory_limit(proc, tmp_path / "nothing", environ={})
    assert limit is None
    assert why.startswith("no job memory limit") and "SLURM_MEM_PER_NODE" in why


@pytest.mark.parametrize(
    ("env", "expected", "source"),
    [
        ({"SLURM_MEM_PER_NODE": "3072"}, 3 * GiB, "SLURM_MEM_PER_NODE=3072 MB"),
        ({"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "2"}, 4 * GiB,
         "SLURM_MEM_PER_CPU=1024 MB x 4 CPUs (SLURM_CPUS_ON_NODE)"),
        ({"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_PER_TASK": "2"}, 2 * GiB,
         "SLURM_MEM_PER_CPU=1024 MB x 2 CPUs (SLURM_CPUS_PER_TASK)"),
        ({"SLURM_MEM_PER_CPU": "1536"}, int(1.5 * GiB), "SLURM_MEM_PER_CPU=1536 MB x 1 CPUs (default)"),
    ],
)  # fmt: skip
def test_slurm_env(tmp_path, monkeypatch, env, expected, source):
    for k in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_CPUS_ON_NODE", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proc = fake_proc(tmp_path, "")
    assert memory_limit(proc, tmp_path / "nothing") == (expected, source)  # environ=None: os.environ


def test_slurm_mem_zero_means_whole_node(tmp_path):
    proc = fake_proc(tmp_path, "")
    assert memory_limit(proc, tmp_path / "nothing", environ={"SLURM_MEM_PER_NODE": "0"})[0] is None


def test_tightest_of_cgroup_and_slurm_wins(tmp_path):
    proc = fake_proc(tmp_path, V2_CGROUP)
    root = v2_tree(tmp_path, {"": "", JOB: str(3 * GiB)})
    assert memory_limit(proc, root, environ={"SLURM_MEM_PER_NODE": "4096"})[1].startswith("cgroup v2")
    limit, source = memory_limit(proc, root, environ={"SLURM_MEM_PER_NODE": "2048"})
    assert (limit, source) == (2 * GiB, "SLURM_MEM_PER_NODE=2048 MB")


def test_auto_budget_capped_by_job_limit(tmp_path):
    proc = fake_proc(tmp_path, "", rss_kib=512 * 1024, avail_kib=64 * 1024 * 1024)  # 0.5 GiB RSS, 64 GiB free
    got, why = cpu_budget("auto", proc, tmp_path / "nothing", environ={"SLURM_MEM_PER_NODE": "3072"})
    assert got == int(0.9 * (3 * GiB - GiB // 2)) < 3 * GiB
    assert why.startswith("auto: 90% of job limit 3.00 GiB from SLURM_MEM_PER_NODE=3072 MB")
    assert "0.50 GiB RSS" in why


def test_auto_budget_without_limit_is_ram(tmp_path):
    proc = fake_proc(tmp_path, "", avail_kib=8 * 1024 * 1024)
    got, why = cpu_budget("auto", proc, tmp_path / "nothing", environ={})
    assert got == int(0.9 * 8 * GiB)
    assert why.startswith("auto: 90% of available RAM 8.00 GiB; no job memory limit")
    # a job limit above the free RAM does not raise the budget
    got, why = cpu_budget("auto", proc, tmp_path / "nothing", environ={"SLURM_MEM_PER_NODE": str(100 * 1024)})
    assert got == int(0.9 * 8 * GiB) and "is looser" in why


def test_explicit_size_above_limit_is_capped_with_warning(tmp_path, caplog):
    proc = fake_proc(tmp_path, "", rss_kib=1024 * 1024)
    env = {"SLURM_MEM_PER_CPU": "2048", "SLURM_CPUS_ON_NODE": "2"}  # 4 GiB
    with caplog.at_level(logging.WARNING, logger="steersweep.core.runtime"):
        got, why = cpu_budget("150GiB", proc, tmp_path / "nothing", environ=env)
    assert got == int(0.9 * 3 * GiB)
    assert "capped" in why and "SLURM_MEM_PER_CPU" in why
    assert "memory.cpu=150GiB is more than this job can hold" in caplog.text


def test_explicit_size_within_limit_and_zero(tmp_path, caplog):
    proc = fake_proc(tmp_path, "")
    env = {"SLURM_MEM_PER_NODE": str(16 * 1024)}
    with caplog.at_level(logging.WARNING, logger="steersweep.core.runtime"):
        assert cpu_budget("2GiB", proc, tmp_path / "nothing", environ=env)[0] == 2 * GiB
        assert cpu_budget("0", proc, tmp_path / "nothing", environ=env) == (0, "memory.cpu=0: no CPU spill")
    assert not caplog.records
    assert cpu_budget("200GiB", proc, tmp_path / "nothing", environ={})[0] == 200 * GiB  # no limit: as asked


def test_limit_below_rss_gives_no_cpu_budget(tmp_path):
    proc = fake_proc(tmp_path, "", rss_kib=2 * 1024 * 1024)
    assert cpu_budget("auto", proc, tmp_path / "nothing", environ={"SLURM_MEM_PER_NODE": "1024"})[0] == 0


def test_max_memory_uses_the_job_limit(monkeypatch):
    from steersweep.core.config import MemoryConfig

    monkeypatch.setenv("SLURM_MEM_PER_NODE", "1024")
    monkeypatch.delenv("SLURM_MEM_PER_CPU", raising=False)
    budget = loading.max_memory(MemoryConfig(cpu="auto"), gpu_totals=[80 * GiB])
    assert budget.get("cpu", 0) < GiB  # the real cgroups here may only tighten it
    assert budget[0] == int(MemoryConfig().gpu_fraction * 80 * GiB)


def test_no_watchdog_line_unless_the_limit_was_chosen(tiny_cli_run, capfd):
    from steersweep.core.runtime import watchdog

    r, _, _ = tiny_cli_run
    assert "[watchdog]" not in r.stderr + r.stdout  # the default 3600 s load limit is not news
    with watchdog(3600.0, "loading x"):
        pass
    assert "[watchdog]" not in capfd.readouterr().err
    with watchdog(600.0, "loading x"):  # memory.load_timeout_s=600: said once
        pass
    assert capfd.readouterr().err.count("[watchdog] loading x:") == 1
