"""The conductor (pipeline.sweep) on a tiny random Llama: sweeps over modes, methods, layer sets and
concepts, and a multi-axis grid resumed without rescoring."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_checkpoint
from omegaconf import OmegaConf

from steersweep.core.config import GenerationConfig
from steersweep.generation.decode import generate_rows


def test_a_sweep_generates_in_its_configured_mode(tiny, tokenizer, embedded_dir, tmp_path):
    """The sweep's own rows (not only the scoring) use steering.mode: each ablate row equals a
    direct ablate decode of its cell, and differs from the add run of the same grid."""
    import pandas as pd

    import steersweep as ss
    from steersweep.inputs.encoding import encode_prompts
    from steersweep.vectors.vectorset import load

    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    common = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=2",
              "generation.max_new_tokens=6", "eval.metrics=[]", "steering.layers=[1]", "steering.alphas=[0,3]",
              "progress=false", "report.enabled=false"]  # fmt: skip
    tables = {}
    for mode in ("add", "ablate"):
        run = ss.Sweep.from_config(overrides=[*common, f"steering.mode={mode}"], run_dir=tmp_path / mode)
        tables[mode] = pd.DataFrame(run.run()).sort_values("cell_id").reset_index(drop=True)
    add, abl = tables["add"], tables["ablate"]
    assert set(abl["mode"]) == {"ablate"}
    steered = abl[abl.alpha != 0]
    assert (steered.completion.to_numpy() != add[add.alpha != 0].completion.to_numpy()).any()
    vs = load(tmp_path / "ablate" / "vectors.safetensors")
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=6))
    for _, row in steered.iterrows():
        ids = encode_prompts(tokenizer, [row.prompt], gen)
        direct = generate_rows(tiny, tokenizer, ids, [(1, 3.0, vs.vectors[1], "ablate")], gen)[0]
        assert direct.text == row.completion


def test_a_sweep_over_methods_modes_and_layer_sets(tiny, tokenizer, embedded_dir, tmp_path):
    """One run, one model load: 2 methods x 2 modes x 2 layer sets x 2 alphas x 2 prompts. Every row
    equals a direct decode of its cell with its own method's vectors; per-setting metrics are keyed so
    that a second run finds them all (nothing is scored or generated again)."""
    import json

    import pandas as pd

    import steersweep as ss
    from steersweep.inputs.encoding import encode_prompts
    from steersweep.runs.folder import RunFolder
    from steersweep.vectors.vectorset import load

    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    over = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=2",
            "generation.max_new_tokens=6", "eval.metrics=[behavior_prob,next_token_kl]", "eval.behavior_limit=3",
            "steering.layers=[1,[1,3]]", "steering.alphas=[0,3]", "steering.mode=[add,ablate_add]",
            "vectors.method=[mean_diff,pca_center]", "progress=false", "report.enabled=false"]  # fmt: skip
    folder = tmp_path / "grid"
    df = pd.DataFrame(ss.Sweep.from_config(overrides=over, run_dir=folder).run())
    assert len(df) == 2 * 2 * 2 * 2 * 2 and df.cell_id.is_unique
    assert set(df.layers) == {"1", "1+3"} and set(df.method) == {"mean_diff", "pca_center"}
    assert set(df["mode"]) == {"add", "ablate_add"}
    assert (df.groupby(["method", "mode", "layers", "alpha"]).size() == 2).all()
    vsets = {
        "mean_diff": load(folder / "vectors.safetensors"),
        "pca_center": load(folder / "vectors-pca_center.safetensors"),
    }
    assert {m: vs.method for m, vs in vsets.items()} == {"mean_diff": "mean_diff", "pca_center": "pca_center"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["vectors_by_set"]) == {"sentiment/mean_diff", "sentiment/pca_center"}
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=6))
    for _, row in df.iterrows():
        layers = [int(x) for x in row.layers.split("+")]
        spec = [(layer, row.alpha, vsets[row.method].vectors[layer], row["mode"]) for layer in layers]
        ids = encode_prompts(tokenizer, [row.prompt], gen)
        assert generate_rows(tiny, tokenizer, ids, [spec], gen)[0].text == row.completion, row.cell_id
        if len(layers) == 1:
            assert row.vector_id == vsets[row.method].vector_id(layers[0])
        else:  # the set's id: concept, label, and the hash of its layers' own tensor hashes
            import hashlib

            own = "|".join(
                f"{k}:{hashlib.sha256(vsets[row.method].vectors[k].numpy().tobytes()).hexdigest()}" for k in layers
            )
            assert row.vector_id == f"sentiment-L1+3-{hashlib.sha256(own.encode()).hexdigest()[:12]}"
            assert row.hook_name == "blocks.1.hook_resid_post+blocks.3.hook_resid_post"
    steered = df[df.alpha != 0]
    assert steered.groupby(["prompt_id", "layers", "alpha"]).completion.nunique().max() > 1  # variants differ
    assert steered.groupby(["method", "mode", "layers"]).behavior_prob.first().nunique() > 1
    done = RunFolder(folder).behavior_done()
    assert set(done) == {(r.concept, r.layers, r.alpha, r.method, r["mode"]) for _, r in df.iterrows()}
    again = pd.DataFrame(ss.Sweep.from_config(overrides=over, run_dir=folder).run())
    pd.testing.assert_frame_equal(again.sort_values("cell_id").reset_index(drop=True),
                                  df.sort_values("cell_id").reset_index(drop=True))  # fmt: skip


def test_two_concepts_in_one_run_from_datasets_and_from_files(tiny, tokenizer, embedded_dir, tmp_path):
    """vectors.concept as a list: each concept's vectors from its own dataset, one grid axis; rows
    equal direct decodes with their own concept's vectors; then the same two concepts from files."""
    import json

    import pandas as pd

    import steersweep as ss
    from steersweep.inputs.encoding import encode_prompts
    from steersweep.vectors.vectorset import load

    pairs = tmp_path / "formal.jsonl"
    pairs.write_text("".join(json.dumps({"positive": a, "negative": b}) + "\n" for a, b in FORMAL))
    items = tmp_path / "formal_items.jsonl"  # the formal concept's own behaviour items
    items.write_text("".join(json.dumps({"id": f"f{i}", "prefix": p, "positive": a, "negative": b}) + "\n" for i, (p, a, b) in
                             enumerate([("The letter began", " Dear Sir", " hey dude"), ("She signed it", " Sincerely", " xoxo")])))  # fmt: skip
    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    common = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=2",
              "generation.max_new_tokens=5", "eval.metrics=[behavior_prob]", "eval.behavior_limit=2",
              "steering.layers=[2]", "steering.alphas=[0,4]", "progress=false", "report.enabled=false"]  # fmt: skip
    over = [*common, "vectors.concept=[sentiment,formal]", f"vectors.dataset=[sentiment_pairs,{pairs}]",
            f"eval.behavior_dataset=[sentiment_continuations,{items}]"]  # fmt: skip
    run = ss.Sweep.from_config(overrides=[*over, f"results_root={tmp_path / 'res'}"])
    df = pd.DataFrame(run.run())
    folder = run.run_dir
    assert "-sentiment+formal-" in folder.name
    assert len(df) == 2 * 2 * 2 and set(df.concept) == {"sentiment", "formal"}
    vsets = {
        "sentiment": load(folder / "vectors.safetensors"),
        "formal": load(folder / "vectors-formal-mean_diff.safetensors"),
    }
    assert vsets["formal"].concept == "formal" and not torch.equal(
        vsets["formal"].vectors[2], vsets["sentiment"].vectors[2]
    )
    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=5))
    for _, row in df.iterrows():
        ids = encode_prompts(tokenizer, [row.prompt], gen)
        direct = generate_rows(tiny, tokenizer, ids, [(2, row.alpha, vsets[row.concept].vectors[2])], gen)[0]
        assert direct.text == row.completion and row.vector_id.startswith(f"{row.concept}-L2-")
    assert df[df.alpha != 0].groupby("concept").behavior_prob.first().nunique() == 2
    # each concept's rows are scored on its own items: alpha 0 is the same model, other items
    base = df[df.alpha == 0].groupby("concept").behavior_prob.first()
    assert base["sentiment"] != base["formal"]
    from steersweep.inputs.datasets import load_behavior_items
    from steersweep.inputs.encoding import pad_id_of
    from steersweep.scoring.behavior import behavior_probs, encode_behavior_items

    enc = encode_behavior_items(tokenizer, load_behavior_items(str(items)), "continuation", True)
    want = behavior_probs(tiny, enc, [(2, 0.0, vsets["formal"].vectors[2])], pad_id_of(tokenizer))[0][0]
    assert base["formal"] == pytest.approx(want, abs=1e-6)
    # the same concepts from the saved files, as a user would reuse them
    files = [folder / "vectors.safetensors", folder / "vectors-formal-mean_diff.safetensors"]
    over = [
        *common,
        "vectors.source=file",
        "vectors.concept=[sentiment,formal]",
        f"vectors.path=[{files[0]},{files[1]}]",
    ]
    again = pd.DataFrame(ss.Sweep.from_config(overrides=over, run_dir=tmp_path / "from files").run())
    key = ["concept", "prompt_id", "alpha"]
    pd.testing.assert_series_equal(again.sort_values(key).completion.reset_index(drop=True),
                                   df.sort_values(key).completion.reset_index(drop=True))  # fmt: skip
    with pytest.raises(Exception, match="lists 2 concept.* gives 1: give one per concept"):
        ss.Sweep.from_config(overrides=[*common, "vectors.concept=[sentiment,formal]"], run_dir=tmp_path / "x").run()


def test_a_multi_axis_grid_resumes_without_rescoring(tiny, embedded_dir, tmp_path, monkeypatch, caplog):
    """A job that dies after one of its batches (methods x modes x layer sets, 4-decode batches) and is
    run again: the table equals an uninterrupted run's, and the resumed job scores no setting the
    dead one had scored (read back from its item files)."""
    import logging

    import pandas as pd

    import steersweep as ss
    from steersweep.runs.folder import RunFolder

    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    over = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=2",
            "generation.max_new_tokens=4", "generation.batch_size=4", "eval.metrics=[behavior_prob,next_token_kl]",
            "eval.behavior_limit=2", "steering.layers=[1,[1,3]]", "steering.alphas=[0,3]",
            "steering.mode=[add,norm_preserving]", "vectors.method=[mean_diff,pca_diff]", "progress=false",
            "report.enabled=false"]  # fmt: skip
    ref = pd.DataFrame(ss.Sweep.from_config(overrides=over, run_dir=tmp_path / "ref").run())
    real, written = RunFolder.write_part, []

    def dies_after_one(self, rows, worker):  # the 2nd batch's items are written, its part is not
        if len(written) == 1:
            raise KeyboardInterrupt("killed")
        written.append(len(rows))
        return real(self, rows, worker)

    monkeypatch.setattr(RunFolder, "write_part", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        ss.Sweep.from_config(overrides=over, run_dir=tmp_path / "run").run()
    monkeypatch.setattr(RunFolder, "write_part", real)

    # what the dead job had scored: the settings in its item files (written before each batch's part), where
    # every alpha-0 setting is one unit (the unsteered model, scored once; the others copy it)
    def units(settings):
        return {("baseline",) if alpha == 0 else (layers, alpha, m, mode) for layers, alpha, m, mode in settings}

    every = units({(r.layers, r.alpha, r.method, r.mode) for r in ref.itertuples()})
    items = RunFolder(tmp_path / "run").read_items()
    scored_before = units({(r.layers, r.alpha, r.method, r.mode) for r in items.itertuples()})
    assert 0 < len(scored_before) < len(every) == 1 + 8  # the baseline + 2 methods x 2 modes x 2 sets at alpha 3
    caplog.set_level(logging.INFO, logger="steersweep")
    again = pd.DataFrame(ss.Sweep.from_config(overrides=over, run_dir=tmp_path / "run").run())
    key = "cell_id"
    pd.testing.assert_frame_equal(
        again.drop(columns=["seconds", "worker", "run_id"]).sort_values(key).reset_index(drop=True),
        ref.drop(columns=["seconds", "worker", "run_id"]).sort_values(key).reset_index(drop=True),
    )
    scored = sum(
        int(r.getMessage().split()[2]) for r in caplog.records if r.getMessage().startswith("behavior_prob for")
    )
    assert scored == len(every) - len(scored_before)
    assert pd.read_parquet(tmp_path / "run" / "items.parquet").equals(
        pd.read_parquet(tmp_path / "ref" / "items.parquet")
    )


FORMAL = [
    ("I would be delighted to attend the meeting.", "yeah sure i'll show up lol"),
    ("Please find the report attached for your review.", "here's the thing u wanted"),
    ("We regret to inform you that the event is cancelled.", "sorry folks, no party"),
    ("Kindly confirm your availability at your earliest convenience.", "u free or what"),
    ("The committee has approved the proposal.", "they said ok to the plan"),
    ("I appreciate your prompt response.", "thx for getting back quick"),
]
