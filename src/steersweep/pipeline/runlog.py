"""Keep a run's log inside its run folder (`<run folder>/logs/`), not in a Hydra folder per call.

Hydra is told to write nothing of its own for a plain run (conf/config.yaml: `hydra.run.dir: .`,
`output_subdir: null`, console-only logging), so `task=plan`, `task=status` or a refused input leave
no trace under results/. A run's records are held in memory until its folder exists (the sweep
creates it only after every check has passed), then go to `logs/<start time>-<host>-<pid>.log`, which begins
with the command line. A run refused before it claims its folder writes nothing at all, also when the
folder exists already and holds another config's plan (a `run_dir` reused with other settings): the log
waits until plan.json names this config's identity.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from steersweep.runs.identity import folder_for, identity, identity_hash
from steersweep.runs.planfile import read_plan_doc

FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class RunLog(logging.Handler):
    """A logging handler that writes into the run folder once it exists, and buffers until then."""

    def __init__(self, cfg: DictConfig, argv: list[str] | None = None):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(FORMAT))
        self.cfg = cfg
        self.argv = sys.argv if argv is None else argv
        self.started = time.strftime("%Y-%m-%d_%H-%M-%S")
        self.pending: list[str] = []
        self.path: Path | None = None
        self._folder: Path | None = None
        self._hash: str | None = None
        self._foreign = False  # the folder holds another config's plan: this job is refused, never logs there

    def folder(self) -> Path | None:
        """The run folder of this config (computed once; None if the config cannot name one)."""
        if self._folder is None:
            if self.cfg.task != "run":  # plan, status, report...: nothing of theirs is kept
                return None
            try:
                self._hash = identity_hash(identity(self.cfg))
                self._folder = folder_for(self.cfg, self._hash)
            except Exception:  # a config refused later, with its own message
                return None
        return self._folder

    def claimed(self, folder: Path) -> bool:
        """Whether `folder` holds this config's plan (claimed by this job, or joined: a resume, a shard)."""
        if self._foreign:
            return False
        try:
            doc = read_plan_doc(folder)
        except Exception:  # an unreadable or older plan: refused with its own message
            return False
        if doc is None:  # not claimed yet: maybe never
            return False
        # plan.json is written once (an exclusive create): another identity there stays there
        self._foreign = doc.get("identity_hash") != self._hash
        return not self._foreign

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:
            self.handleError(record)

    def write(self, line: str) -> None:
        """One line into the run's log (held back until the run folder exists)."""
        self.pending.append(line)
        if self.path is None:
            folder = self.folder()
            if folder is None or not self.claimed(folder):
                return
            # host and PID: shards and ranks of one run start in the same second
            self.path = folder / "logs" / f"{self.started}-{socket.gethostname()}-{os.getpid()}.log"
            self.path.parent.mkdir(exist_ok=True)
            self.pending.insert(0, "# " + shlex.join(["python", *self.argv]))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(self.pending) + "\n")
        self.pending.clear()

    def __enter__(self) -> RunLog:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] exit")
        logging.getLogger().removeHandler(self)
