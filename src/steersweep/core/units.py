"""Sizes and durations in words and back: `parse_size` ("80GiB", "90%"-free numbers), `fmt_bytes`,
`fmt_seconds`."""

from __future__ import annotations

import re

from steersweep.core.errors import LoadError


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str | int | float) -> int:
    """'80GiB' -> bytes (GiB = 2^30, GB = 10^9). Bits ('Gb') are refused rather than guessed."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or (m.group(2) and m.group(2)[-1] == "b" and m.group(2) != "b"):
        raise LoadError(f"cannot read size {text!r}: write it like 80GiB, 150GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
