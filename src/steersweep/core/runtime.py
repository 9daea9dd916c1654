"""Facts about the process and machine a run lives in: RAM, the job's memory limit, watchdogs.

A Slurm job started with `--mem` is killed by the kernel's OOM killer, without a Python traceback,
the moment it passes its limit. /proc/meminfo shows the whole node, not that limit, so every RAM
budget here is capped by `memory_limit()`: cgroup v2 `memory.max`, cgroup v1
`memory.limit_in_bytes`, and Slurm's SLURM_MEM_PER_NODE / SLURM_MEM_PER_CPU (the only trace of the
limit on clusters that enforce it without cgroups, e.g. task/none with accounting). The filesystem
roots are parameters so tests can point them at fake trees.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from steersweep.core.config import MemoryConfig
from steersweep.core.units import parse_size

log = logging.getLogger(__name__)

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
AUTO_FRACTION = 0.9  # share of available RAM, or of the room left under a job limit, given to the CPU spill
# cgroup v1 writes "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages); any value
# this large is "unlimited", never a real machine.
UNLIMITED_V1 = 2**60
MIB = 2**20  # Slurm's MB in --mem and SLURM_MEM_* is MiB (--mem=3G -> SLURM_MEM_PER_NODE=3072)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# RAM


def available_ram(proc: Path = PROC) -> int:
    """Bytes of RAM available now (MemAvailable), or total RAM where /proc/meminfo is missing.

    This is the node's view: inside a job with a memory limit, see `memory_limit()`.
    """
    with contextlib.suppress(OSError):
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def current_rss(proc: Path = PROC) -> int:
    """Resident bytes of this process (VmRSS), 0 where /proc is unreadable."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (proc / "self" / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _own_cgroups(proc: Path) -> dict[str, str]:
    """{"v2": path} and/or {"memory": path} (v1) from /proc/self/cgroup ("id:controllers:path" lines)."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in (proc / "self" / "cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            hid, controllers, path = parts
            if hid == "0" and controllers == "":
                found["v2"] = path
            elif "memory" in controllers.split(","):
                found["memory"] = path
    return found


def _walk_up(mount: Path, cg_path: str) -> Iterator[tuple[Path, str]]:
    """This cgroup's folder and every ancestor's, innermost first: a parent's limit binds its children.

    Folders that do not exist are skipped: with a cgroup namespace the path in /proc/self/cgroup may
    name folders outside the mount ("/.." parts), and then only the mounted part can be read.
    """
    parts = [p for p in cg_path.split("/") if p and p != ".."]
    for i in range(len(parts), -1, -1):
        rel = "/" + "/".join(parts[:i])
        d = mount.joinpath(*parts[:i])
        if d.is_dir():
            yield d, rel


def _read_int(path: Path) -> int | str | None:
    """The file's integer, its raw word when not an integer ("max"), None when unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _cgroup_v2_limit(proc: Path, root: Path, notes: list[str]) -> tuple[int, str] | None:
    cg = _own_cgroups(proc).get("v2")
    # Pure v2 mounts the unified hierarchy at the root; hybrid systems mount it at root/unified.
    mount = next((m for m in (root, root / "unified") if (m / "cgroup.controllers").is_file()), None)
    if cg is None or mount is None:
        notes.append("no cgroup v2")
        return None
    best: tuple[int, str] | None = None
    for d, rel in _walk_up(mount, cg):
        v = _read_int(d / "memory.max")
        if isinstance(v, int) and (best is None or v < best[0]):
            best = (v, f"cgroup v2 memory.max of {rel}")
    if best is None:
        notes.append("cgroup v2 memory.max: max")
    return best


def _cgroup_v1_limit(proc: Path, root: Path, notes: list[str]) -> tuple[int, str] | None:
    cg = _own_cgroups(proc).get("memory")
    mount = None
    with contextlib.suppress(OSError):
        # The memory controller is usually mounted alone at root/memory, but may share a mount ("memory,x").
        mount = next((d for d in sorted(root.iterdir()) if "memory" in d.name.split(",") and d.is_dir()), None)
    if cg is None or mount is None:
        notes.append("no cgroup v1 memory controller")
        return None
    best: tuple[int, str] | None = None
    for d, rel in _walk_up(mount, cg):
        v = _read_int(d / "memory.limit_in_bytes")
        if isinstance(v, int) and v < UNLIMITED_V1 and (best is None or v < best[0]):
            best = (v, f"cgroup v1 memory.limit_in_bytes of {rel}")
    if best is None:
        notes.append("cgroup v1 memory: unlimited")
    return best


def _slurm_limits(env: Mapping[str, str], notes: list[str]) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    node = env.get("SLURM_MEM_PER_NODE")
    # 0 asks Slurm for all the node's memory: no limit beyond the node's own.
    if node and node.isdigit() and int(node) > 0:
        found.append((int(node) * MIB, f"SLURM_MEM_PER_NODE={node} MB"))
    per_cpu = env.get("SLURM_MEM_PER_CPU")
    if per_cpu and per_cpu.isdigit() and int(per_cpu) > 0:
        cpus, var = 1, "default"
        for name in ("SLURM_CPUS_ON_NODE", "SLURM_CPUS_PER_TASK"):
            if env.get(name, "").isdigit() and int(env[name]) > 0:
                cpus, var = int(env[name]), name
                break
        found.append((int(per_cpu) * MIB * cpus, f"SLURM_MEM_PER_CPU={per_cpu} MB x {cpus} CPUs ({var})"))
    if not found:
        notes.append("no SLURM_MEM_PER_NODE/SLURM_MEM_PER_CPU")
    return found


def memory_limit(
    proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT, environ: Mapping[str, str] | None = None
) -> tuple[int | None, str]:
    """The tightest memory limit on this process: (bytes, where it came from), or (None, why none).

    Checks cgroup v2 `memory.max` and cgroup v1 `memory.limit_in_bytes` of this process's cgroup and
    all its ancestors, and Slurm's SLURM_MEM_PER_NODE, or SLURM_MEM_PER_CPU x CPUs
    (SLURM_CPUS_ON_NODE, else SLURM_CPUS_PER_TASK, else 1). All of them are enforced independently,
    so the smallest one is the one that kills the job.
    """
    env = os.environ if environ is None else environ
    notes: list[str] = []
    candidates = [
        c
        for c in (_cgroup_v2_limit(proc, cgroup_root, notes), _cgroup_v1_limit(proc, cgroup_root, notes))
        if c is not None
    ]
    candidates += _slurm_limits(env, notes)
    if not candidates:
        return None, "no job memory limit (" + "; ".join(notes) + ")"
    return min(candidates, key=lambda c: c[0])


def cpu_budget(
    spec: str, proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT, environ: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Bytes the CPU spill (`memory.cpu`) may use here, and a sentence saying which limit applied.

    "auto" is 90% of the RAM available now, capped by the job's memory limit: 90% of (limit - this
    process's RSS). The limit counts everything the job holds, and accelerate's budget covers weights
    only, so what the process already uses (torch, tokenizer, data) is taken off first and 10% is
    left for what loading and generation add on top (read buffers, dtype casts, activations and the
    KV cache of CPU-resident layers), the same margin "auto" leaves of free RAM.

    An explicit size ("150GiB") above that cap is capped to it with a warning, not refused: going past
    the limit is exactly the silent OOM kill to prevent, while a capped plan either fits or makes
    accelerate say so (or offload to disk), and a preset written for a large node still runs in a
    smaller job. "0" turns the CPU spill off.
    """
    limit, source = memory_limit(proc, cgroup_root, environ)
    cap, cap_why = None, ""
    if limit is not None:
        rss = current_rss(proc)
        cap = max(0, int(AUTO_FRACTION * (limit - rss)))
        cap_why = f"90% of job limit {_gib(limit)} from {source}, less this process's {_gib(rss)} RSS"
    if str(spec).strip().lower() == "auto":
        avail = available_ram(proc)
        ram = int(AUTO_FRACTION * avail)
        if cap is not None and cap < ram:
            return cap, f"auto: {cap_why}"
        looser = f"job limit {_gib(limit)} from {source} is looser" if limit is not None else source
        return ram, f"auto: 90% of available RAM {_gib(avail)}; {looser}"
    # Deferred: loading imports this module, and parse_size lives there (with LoadError for bad sizes).

    asked = parse_size(spec)
    if asked == 0:
        return 0, "memory.cpu=0: no CPU spill"
    if cap is not None and asked > cap:
        log.warning(
            "memory.cpu=%s is more than this job can hold: capped to %s (%s); past it the kernel kills the job",
            spec, _gib(cap), cap_why,
        )  # fmt: skip
        return cap, f"memory.cpu={spec} capped to {cap_why}"
    within = f"within job limit {_gib(limit)} from {source}" if limit is not None else source
    return asked, f"memory.cpu={spec}; {within}"


# ---------------------------------------------------------------------------------------------
# Watchdog


WATCHDOG_EXIT = 3  # exit status of a run stopped by a watchdog


@contextlib.contextmanager
def watchdog(seconds: float, what: str, announce: bool | None = None):
    """Dump every thread's stack and exit (status 3) if the body runs longer than `seconds`.

    A timer thread says what stalled, dumps all stacks and exits; faulthandler's C-level timer
    backs it up a minute later in case a hang never releases the GIL. The limit is said on stderr
    when `announce` is True, or (None) when it is not the default `memory.load_timeout_s`, i.e.
    someone chose it; otherwise only at debug level (a line on every run says nothing new).
    """
    if not seconds or seconds <= 0:
        yield
        return
    line = f"[watchdog] {what}: stacks are dumped and the run exits if this takes over {seconds:.0f} s"
    if announce is None:
        announce = seconds != MemoryConfig.load_timeout_s
    if announce:
        print(line, file=sys.stderr, flush=True)
    else:
        log.debug("%s", line)

    def fire() -> None:
        print(f"[watchdog] {what} has run for over {seconds:.0f} s: dumping all thread stacks and exiting "
              f"(status {WATCHDOG_EXIT}); raise the limit in conf/memory if it is only slow",
              file=sys.stderr, flush=True)  # fmt: skip
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(WATCHDOG_EXIT)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(seconds + 60, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
