"""File modes as the running process's umask makes them."""

from __future__ import annotations

import os


def umask_mode() -> int:
    old = os.umask(0)
    os.umask(old)
    return 0o666 & ~old
