"""Static security checks over the source tree."""

from __future__ import annotations

import re

from helpers.checkout import ROOT

SOURCES = [p for d in ("src", "benchmarks") for p in (ROOT / d).rglob("*.py")] + [ROOT / "run_experiment.py"]


def test_every_torch_load_is_weights_only():
    calls = []
    for p in SOURCES:
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start() : text.find(")", m.start()) + 1]
            calls.append((p.name, call))
            assert "weights_only=True" in call, f"{p}: {call}"
    assert calls  # the vector loader uses it


def test_trust_remote_code_only_from_config():
    for p in SOURCES:
        for line in p.read_text().splitlines():
            assert not re.search(r"trust_remote_code\s*=\s*True", line), f"{p}: {line.strip()}"
