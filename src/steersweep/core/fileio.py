"""Atomic file writes and exclusive claims, shared by results, vectors, plans and exchange files.

A writer puts its bytes in a temporary file named after its host and PID, fsyncs it and renames it
into place, so a reader sees either the whole file or none. A writer killed mid-write leaves its
temporary file behind; `clean_stale_tmp` removes only those whose writer is provably gone (same
host, PID no longer alive) or that are a day old, so it is safe while other writers are at work.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from steersweep.core.faults import fault_point

STALE_TMP_S = 24 * 3600  # a temporary file this old belongs to no live writer on any host


def _tmp_name(path: Path) -> Path:
    host = socket.gethostname().replace(".", "_") or "host"
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only swap)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(path: Path) -> None:
    """Give `path` the mode open() gives a new file (0o666 less the umask): some writers
    (safetensors, tempfile.mkstemp) make 0600 files that the other users of a shared folder cannot read."""
    os.chmod(path, 0o666 & ~_umask())


def _write_tmp(path: Path, write: Callable[[Path], object]) -> Path:
    tmp = _tmp_name(path)
    try:
        write(tmp)
        follow_umask(tmp)  # every file written here, whatever made it
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: Path, write: Callable[[Path], object]) -> None:
    """Write through `write(tmp_path)`, fsync, then rename into place; remove the tmp on failure."""
    path = Path(path)
    tmp = _write_tmp(path, write)
    try:
        fault_point("write")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def claim(path: Path, text: str) -> bool:
    """Create `path` holding `text` only if it does not exist yet; True if this call created it.

    The content is written in full first and then hard-linked into place, so of two processes
    claiming at once exactly one wins and the loser (and any reader) sees the winner's whole file.
    """
    path = Path(path)
    tmp = _write_tmp(path, lambda t: Path(t).write_text(text))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_tmp(folder: Path) -> list[Path]:
    """Remove temporary files of writers that died (this host, dead PID) or that are a day old."""
    removed = []
    host = socket.gethostname().replace(".", "_") or "host"
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.split(".")
        # .<name>.<host>.<pid>.<uuid>.tmp; names of older writers lack host and pid: age rule only
        try:
            mine = parts[-4] == host and not _pid_alive(int(parts[-3]))
        except (IndexError, ValueError):
            mine = False
        try:
            old = time.time() - tmp.stat().st_mtime > STALE_TMP_S
        except FileNotFoundError:
            continue
        if mine or old:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
