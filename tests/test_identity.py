"""A run's identity (runs.identity): the keys and input digests that decide its rows, and the default
folder names built from them."""

from __future__ import annotations

from pathlib import Path

from helpers.config import make

from steersweep.runs.grid import Grid, expand
from steersweep.runs.identity import folder_for, identity, identity_hash


def test_method_mode_and_positions_are_part_of_the_identity():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from steersweep.core.config import register_configs
    from steersweep.runs.identity import identity, identity_hash

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    hashes = set()
    for extra in ([], ["vectors.method=logistic"], ["steering.mode=ablate"], ["steering.positions=from:3"]):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="config", overrides=extra)
        ident = identity(cfg)
        hashes.add(identity_hash(ident))
        assert ident["vectors"]["method"] == cfg.vectors.method and ident["steering"]["mode"] == cfg.steering.mode
    assert len(hashes) == 4


def test_default_folders_differ_by_config_and_are_readable(tmp_path, monkeypatch):
    a, b, c = make(), make("generation.max_new_tokens=5"), make("generation.batch_size=3")
    ha, hb, hc = (identity_hash(identity(x)) for x in (a, b, c))
    assert ha != hb and ha == hc  # batching never changes a row, decoding does
    fa = folder_for(a, ha)
    assert fa.name == f"smollm2_135m-sentiment-{ha}" and fa.parent == Path.cwd() / "results"
    monkeypatch.chdir(tmp_path)  # ./results of the folder the command runs in, wherever the package is
    assert folder_for(a, ha) == tmp_path / "results" / fa.name
    assert folder_for(make("run_name=mine"), ha).name == f"mine-{ha}"
    assert folder_for(make("run_dir=/x/y"), ha) == Path("/x/y")
    # the identity hash is part of every cell id: two configs never share a cell id
    prompts = [{"id": "p", "prompt": "hi"}]
    assert not {c.cell_id for c in expand(Grid.of(a), prompts, ha)} & {
        c.cell_id for c in expand(Grid.of(b), prompts, hb)
    }


def test_editing_an_input_file_is_another_identity(tmp_path):
    """Same path, other content: a resume must not mix rows made from the old and the new text."""
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"id": "a", "prompt": "Hello"}\n')
    before = identity(make(f"prompts.dataset={f}"))
    f.write_text('{"id": "a", "prompt": "Goodbye"}\n')
    after = identity(make(f"prompts.dataset={f}"))
    assert identity_hash(before) != identity_hash(after)
    from steersweep.runs.identity import differing_keys

    assert differing_keys(before, after) == ["input_files.prompts"]
