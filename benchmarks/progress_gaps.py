"""How often the progress display moves: run a command on a pseudo-terminal, report the gaps.

    .venv/bin/python benchmarks/progress_gaps.py .venv/bin/python run_experiment.py results_root=/tmp/gaps

Issue 12's target: during `make run` the progress bar advances at least every 5 seconds. The command
runs on a pty with a real window size (tqdm draws nothing on a 0-column terminal); every screen update
is timestamped, and the gaps between the first progress bar and the run's `done:` line are printed,
largest last. A measurement, not a test: how long a gap is depends on the machine.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    t0 = time.time()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    events: list[tuple[float, str]] = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        now = time.time() - t0
        events += [(now, p.decode(errors="replace")) for p in re.split(rb"[\r\n]", data) if p.strip()]
    proc.wait()
    start = next((t for t, s in events if "tok" in s and ("generating" in s or "scoring" in s)), None)
    if start is None:
        print(f"exit {proc.returncode}; no progress bar seen")
        return 1
    end = next((t for t, s in events if s.startswith("done:")), events[-1][0])
    shown = [(t, s) for t, s in events if start <= t <= end]
    gaps = sorted((b[0] - a[0], a[0], a[1]) for a, b in zip(shown, shown[1:], strict=False))
    print(f"exit {proc.returncode}; {len(shown)} screen updates in {end - start:.0f} s between the first bar and done")
    for gap, at, text in gaps[-5:]:
        print(f"  gap {gap:.1f} s at {at:.0f} s after: {text[:100]!r}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
