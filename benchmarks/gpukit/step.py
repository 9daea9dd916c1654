"""One check in its own process: `python -m gpukit.step NAME --out DIR --scale gpu|dry --kit KIT`.

Writes DIR/NAME.json: {"result": ...} or {"error": "...", "traceback": "...", "partial": ...}. A check
fills `partial` as it goes, so a check stopped at its limit still reports what it measured. The
orchestrator (`python -m gpukit`) runs each check this way under its own time limit: when the limit
passes it sends SIGTERM (here: a TimeoutError, the partial results written), then SIGKILL to the whole
process group, so a hang in one check cannot eat the run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

CHECKS = ("split", "throughput", "spill70b", "load8b")


def _stopped(signum, frame) -> None:
    raise TimeoutError("stopped at the check's time limit (SIGTERM from the orchestrator)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpukit.step")
    ap.add_argument("name", choices=CHECKS)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scale", choices=("gpu", "dry"), required=True)
    ap.add_argument("--kit", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (checkpoints); default a new temp folder")
    a = ap.parse_args(argv)
    from .common import SCALES

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", stream=sys.stdout)
    work = a.work or Path(tempfile.mkdtemp(prefix=f"gpukit-{a.name}-"))
    t0 = time.perf_counter()
    partial: dict = {}
    signal.signal(signal.SIGTERM, _stopped)
    try:
        result = importlib.import_module(f"gpukit.{a.name}").run(SCALES[a.scale], a.kit, work, sys.stdout, partial)
        doc = {"result": result}
    except Exception as e:  # the orchestrator records it and goes on with the next check
        traceback.print_exc()
        doc = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500], "traceback": traceback.format_exc(),
               "partial": partial}  # fmt: skip
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    tmp = a.out / f".{a.name}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(a.out / f"{a.name}.json")
    return 0 if "result" in doc else 1


if __name__ == "__main__":
    sys.exit(main())
