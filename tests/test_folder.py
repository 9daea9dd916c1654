"""The run folder (runs.folder): part files, the resume set, the merge, secrets scrubbed."""

from __future__ import annotations

import pandas as pd

from steersweep.runs.folder import FIXED, RunFolder, scrub


def row(cid, layer=1, alpha=0.0, **kw):
    base = {k: None for k in FIXED}
    base.update(run_id="r", cell_id=cid, model="m", layer=layer, alpha=alpha, prompt_id=cid, sample=0, completion="x")
    base.update(kw)
    return base


def test_parts_merge_dedup_and_skip_corrupt(tmp_path):
    f = RunFolder(tmp_path / "run")
    f.create()
    f.write_part([row("a"), row("b", metric_x=1.0)], "w0")
    f.write_part([row("b"), row("c", layer=2)], "w1")  # "b" again: a duplicate
    (f.parts / "part-w9-corrupt.parquet").write_bytes(b"PAR1 half written")
    assert f.done_cells() == {"a", "b", "c"}
    df, path = f.merge()
    assert sorted(df.cell_id) == ["a", "b", "c"]
    assert pd.read_parquet(path).shape[0] == 3
    assert list(df.columns[: len(FIXED)]) == FIXED
    assert not list(f.parts.glob(".*tmp"))


def test_scrub_secrets():
    m = scrub({"env": {"HF_TOKEN": "hf_abc", "path": "/x"}, "api_key": "k", "list": [{"password": 1}]})
    assert m == {
        "env": {"HF_TOKEN": "<redacted>", "path": "/x"},
        "api_key": "<redacted>",
        "list": [{"password": "<redacted>"}],
    }
