"""The embedded model (model.embedded): its conversion's shards are readable by others, and a checkpoint
left private by an older conversion is made readable."""

from __future__ import annotations

import os
import stat

import pytest


def test_embedded_checkpoint_left_private_by_an_older_conversion_is_made_readable(tmp_path):
    from steersweep.model.embedded import STAMP, prepare

    done = tmp_path / "model"
    done.mkdir()
    (done / STAMP).write_text("{}")
    for name, mode in (("model-00001-of-00003.safetensors", 0o600), ("config.json", 0o644), ("mine.txt", 0o640)):
        (done / name).write_bytes(b"x")
        (done / name).chmod(mode)
    old = os.umask(0o022)
    try:
        assert prepare(done) == done
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in done.iterdir() if p.name != STAMP}
    # safetensors' 0600 becomes what open() makes; a mode someone chose on purpose is kept
    assert modes == {"model-00001-of-00003.safetensors": 0o644, "config.json": 0o644, "mine.txt": 0o640}


@pytest.mark.slow
def test_embedded_conversion_writes_shards_others_can_read(tmp_path):
    from steersweep.model.embedded import prepare

    old = os.umask(0o027)
    try:
        out = prepare(tmp_path / "model")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len([n for n in modes if n.endswith(".safetensors")]) == 3
    assert set(modes.values()) == {0o640}, modes  # the umask's mode, not safetensors' private 0600
