"""`python -m gpukit --out DIR [--dry-run] [--only CHECK ...] [--budget-s S]`: every check, one JSON, one log.

Each check runs as `python -m gpukit.step` in its own process group under its own limit (LIMITS; the
run's remaining budget when that is less); a check that overruns is killed with its children and
recorded as "timeout", one that raises as "failed", and the run goes on. DIR/gpukit.json holds the
device, the versions, every check's result and every target; DIR/gpukit.log everything printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .common import KIT, ROOT, device_facts
from .step import CHECKS
from .targets import evaluate

# seconds per check on the GPU node (the dry run gives each DRY_LIMIT); the whole run: --budget-s
LIMITS = {"split": 120, "throughput": 150, "spill70b": 210, "load8b": 210}
DRY_LIMIT = 900
GRACE_S = 15  # after SIGTERM at a check's limit, before SIGKILL
# Which transformers the node runs, and why (docs/gpu.md): its own.
TRANSFORMERS = (
    "the node's own transformers 5.17 (with its accelerate 1.15 and huggingface-hub 1.33): pyproject's lower "
    "bounds are those versions and `make test-oldest` runs the fast suite on them on CPU; carrying 5.25 would "
    "also need huggingface-hub >= 2.4 and kernels, none of it needed by the code"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpukit", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpukit.json, gpukit.log and each check's JSON")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: the same calls, seconds each")
    ap.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="checks to run, in this order")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole run's wall-clock budget (seconds)")
    ap.add_argument("--limit-s", type=float, default=None, help="every check's own limit (default: LIMITS)")
    ap.add_argument("--kit", type=Path, default=KIT, help="the folder `make gpu-kit` prepared (its tokenizer/)")
    return ap.parse_args(argv)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def run_check(name: str, args: argparse.Namespace, limit: float, log) -> dict:
    """One check in its own process group; killed with its children when `limit` passes."""
    scale = "dry" if args.dry_run else "gpu"
    log.write(f"\n===== {name}: limit {limit:.0f} s =====\n")
    log.flush()
    cmd = [sys.executable, "-m", "gpukit.step", name, "--out", str(args.out), "--scale", scale, "--kit", str(args.kit)]
    (args.out / f"{name}.json").unlink(missing_ok=True)
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    timed_out = False
    try:
        p.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(p.pid, signal.SIGTERM)  # the check writes what it has measured so far
        try:
            p.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(p.pid, signal.SIGKILL)  # also what the check started (sweeps through run_experiment.py)
    p.wait()
    wall = round(time.monotonic() - t0, 2)
    path = args.out / f"{name}.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}
    status = "timeout" if timed_out else "ok" if "result" in rec else "failed"
    if status == "failed" and "error" not in rec:
        rec["error"] = f"the check's process exited {p.returncode} without writing its result (see gpukit.log)"
    return {"status": status, "limit_s": limit, "wall_s": wall, **rec}


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device: run on the GPU node, or add --dry-run for the CPU dry run", file=sys.stderr)
        return 2
    if not (args.kit / "tokenizer" / "tokenizer_config.json").is_file():
        print(f"error: {args.kit}/tokenizer is missing: run `make gpu-kit` first (it is carried with the kit)",
              file=sys.stderr)  # fmt: skip
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    steps: dict[str, dict] = {}
    with open(args.out / "gpukit.log", "a") as log:
        log.write(f"gpukit {'dry run' if args.dry_run else 'GPU run'} at {dt.datetime.now(dt.UTC).isoformat()}\n")
        for name in args.only:
            left = args.budget_s - (time.monotonic() - start)
            own = args.limit_s or (DRY_LIMIT if args.dry_run else LIMITS[name])
            limit = min(own, left)
            if limit < 30:
                steps[name] = {"status": "skipped", "error": f"only {left:.0f} s of the run's budget left"}
            else:
                steps[name] = run_check(name, args, limit, log)
            s = steps[name]
            print(f"{name:>10}: {s['status']} {s.get('wall_s', 0):.0f} s" + (f" ({s['error']})" if "error" in s else ""),
                  flush=True)  # fmt: skip
    doc = {
        "kit": "steersweep gpukit", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scale": "dry" if args.dry_run else "gpu", **device_facts(), "transformers": TRANSFORMERS,
        "wall_s": round(time.monotonic() - start, 2), "steps": steps, "targets": evaluate(steps),
    }  # fmt: skip
    tmp = args.out / ".gpukit.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(args.out / "gpukit.json")
    print(f"\n{'target':<46} {'measured':>12} {'threshold':>10}  met")
    for name, t in doc["targets"].items():
        m = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        print(f"{name:<46} {m:>12} {t['direction']}{t['threshold']:>9g}  {'yes' if t['met'] else 'NO'}")
    print(f"\n{args.out / 'gpukit.json'} ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
