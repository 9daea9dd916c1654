"""Steerability from the item table equals a plain numpy/scipy computation written here, item by item."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from steersweep.scoring.reliability import most_steerable, steerability


def item_table(seed: int = 0) -> pd.DataFrame:
    """Two layers x two item sets x 12 items x 5 alphas, propensities linear in alpha plus noise; some
    items anti-steerable; one setting with a single alpha (no slope)."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer, gain in ((3, 0.1), (10, 1.5)):
        for item_set, shift in (("own", 0.0), ("held_out", -0.8)):
            for i in range(12):
                slope = gain + shift + rng.normal(0, 0.7)
                for alpha in (-1.0, -0.5, 0.0, 0.5, 1.0):
                    y = 0.3 * i + slope * alpha + rng.normal(0, 0.2)
                    rows.append(("c", "mean_diff", "add", str(layer), layer, alpha, item_set, f"i{i}", y))
    for i in range(3):
        rows.append(("c", "mean_diff", "add", "20", 20, 0.0, "own", f"i{i}", 0.1))
    cols = ["concept", "method", "mode", "layers", "layer", "alpha", "item_set", "item_id", "propensity"]
    return pd.DataFrame(rows, columns=cols)


def reference(items: pd.DataFrame, layers: str, item_set: str) -> dict:
    """One setting, plainly: np.polyfit per item, then the statistics over items."""
    sel = items[(items.layers == layers) & (items.item_set == item_set)]
    slopes, residuals = [], []
    sst = 0.0
    for _, it in sel.groupby("item_id"):
        a, y = it.alpha.to_numpy(), it.propensity.to_numpy()
        slope, intercept = np.polyfit(a, y, 1)
        slopes.append(slope)
        residuals += list(y - (slope * a + intercept))
        sst += float(((y - y.mean()) ** 2).sum())
    slopes = np.array(slopes)
    sem = slopes.std(ddof=1) / math.sqrt(len(slopes))
    sse = float(np.sum(np.square(residuals)))
    return {
        "n_items": len(slopes),
        "mean_slope": slopes.mean(),
        "slope_ci_low": slopes.mean() - 1.96 * sem,
        "slope_ci_high": slopes.mean() + 1.96 * sem,
        "median_slope": np.median(slopes),
        "anti_steerable": np.mean(slopes < 0),
        "spearman": stats.spearmanr(sel.alpha, sel.propensity).statistic,
        "residual_rms": math.sqrt(sse / len(sel)),
        "r2": 1 - sse / sst,
    }


def test_steerability_equals_a_plain_computation():
    items = item_table()
    table = steerability(items)
    assert len(table) == 4  # the single-alpha setting has no slope
    for layers in ("3", "10"):
        for item_set in ("own", "held_out"):
            got = table[(table.layers == layers) & (table.item_set == item_set)].iloc[0]
            for key, want in reference(items, layers, item_set).items():
                assert got[key] == pytest.approx(want, rel=1e-9, abs=1e-12), (layers, item_set, key)
    own = table[table.item_set == "own"].set_index("layers")
    assert own.mean_slope["10"] > own.mean_slope["3"] and own.anti_steerable["10"] < own.anti_steerable["3"]


def test_the_recommended_layer_is_the_reliably_steerable_one():
    table = steerability(item_table())
    best = most_steerable(table[table.item_set == "own"])
    assert best is not None and best.layers == "10"
    # a larger mean slope with an interval reaching below 0 loses to a reliably positive one
    toy = pd.DataFrame(
        {"layers": ["a", "b"], "mean_slope": [5.0, 1.0], "slope_ci_low": [-0.5, 0.4], "anti_steerable": [0.4, 0.1]}
    )
    assert most_steerable(toy).layers == "b"
    assert most_steerable(toy.assign(slope_ci_low=[-1.0, -0.1])) is None


def tiny_sweep(tiny, embedded_dir, tmp_path, *more: str):
    from helpers.models import tiny_checkpoint

    import steersweep as ss

    model_dir = tiny_checkpoint(tmp_path / "tiny model", embedded_dir, tiny)
    over = [f"model.path={model_dir}", "model.num_hidden_layers=4", "model.dtype=float32", "prompts.limit=3",
            "generation.max_new_tokens=3", "generation.batch_size=2", "steering.layers=[1,[2,3]]",
            "steering.alphas=[-2,0,2]", "eval.behavior_limit=4", "eval.behavior_sets=[sentiment_ab]",
            "eval.metrics=[behavior_prob]", "report.enabled=false", "progress=false", *more]  # fmt: skip
    run = ss.Sweep.from_config(overrides=over, run_dir=tmp_path / "run")
    return run, run.run()


def test_item_rows_equal_a_plain_forward_per_item(tiny, tokenizer, embedded_dir, tmp_path):
    """Every item row's log-probs are those of one unbatched, unpadded forward of that item (float32), and
    each setting's behavior_prob in results.parquet is the mean of its item rows, exactly."""
    from helpers.behavior import AB, CONT, written_out
    from safetensors.torch import load_file

    run, df = tiny_sweep(tiny, embedded_dir, tmp_path)
    items = pd.read_parquet(run.run_dir / "items.parquet")
    assert set(items.item_set) == {"sentiment_continuations", "sentiment_ab"}
    assert len(items) == 2 * 3 * 4 * 2  # layer sets x alphas x items x sets: every alpha-0 setting has its rows
    vectors = load_file(run.run_dir / "vectors.safetensors")
    vec = {int(k.split(".")[1]): v for k, v in vectors.items() if k.startswith("layer.")}
    sets = {"sentiment_continuations": ("continuation", {c["id"]: c for c in CONT}),
            "sentiment_ab": ("ab", {c["id"]: c for c in AB})}  # fmt: skip
    chat = bool(tokenizer.chat_template)
    for r in items.itertuples():
        fmt, by_id = sets[r.item_set]
        it = by_id[r.item_id]
        context, special, match, other = written_out(tokenizer, it, fmt, chat)
        steered = [int(x) for x in r.layers.split("+")]

        def lp(answer, context=context, special=special, steered=steered, alpha=r.alpha):
            return reference_logprob_sets(tiny, tokenizer, context, special, answer, steered, alpha, vec)

        assert r.logp_match == pytest.approx(lp(match), abs=2e-5), r
        assert r.logp_other == pytest.approx(lp(other), abs=2e-5), r
        assert r.propensity == r.logp_match - r.logp_other
    # the alpha-0 baseline: the same item rows for every layer set
    zero = items[items.alpha == 0].pivot_table(index=["item_set", "item_id"], columns="layers", values="propensity")
    assert (zero.nunique(axis=1) == 1).all()
    # behavior_prob per setting = numpy's mean of its item rows on the main set, bit for bit
    main = items[items.item_set == "sentiment_continuations"]
    for (layers, alpha), g in main.groupby(["layers", "alpha"]):
        assert (
            df[(df.layers == layers) & (df.alpha == alpha)].behavior_prob == np.mean(g.behavior_prob.to_numpy())
        ).all()


def reference_logprob_sets(model, tok, context, special, answer, layers, alpha, vectors):
    """test_behavior_reference.reference_logprob with a layer set: one plain forward, hooks on every layer."""
    from helpers.behavior import reference_logprob

    if len(layers) == 1:
        return reference_logprob(
            model, tok, context, special, answer, layers[0], alpha, vectors[layers[0]], "all", False
        )
    import torch

    handles = []
    for layer in layers[1:]:

        def hook(module, args, output, v=vectors[layer]):
            h = output[0] if isinstance(output, tuple) else output
            h = h + alpha * v.to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return reference_logprob(
                model, tok, context, special, answer, layers[0], alpha, vectors[layers[0]], "all", False
            )
    finally:
        for h in handles:
            h.remove()


def test_a_resumed_sweep_keeps_its_item_table(tiny, embedded_dir, tmp_path):
    """A sweep whose last parts were lost resumes: settings already scored are read back from the item
    files (not scored again), and the merged item table is the uninterrupted run's."""
    run, _ = tiny_sweep(tiny, embedded_dir, tmp_path)
    first = pd.read_parquet(run.run_dir / "items.parquet")
    parts = sorted((run.run_dir / "parts").glob("part-*.parquet"))
    n_item_files = len(list((run.run_dir / "items").glob("item-*.parquet")))
    for p in parts[len(parts) // 2 :]:
        p.unlink()
    (run.run_dir / "results.parquet").unlink()
    again = run.run()
    assert run.summary["written"] > 0 and len(again) == 2 * 3 * 3
    assert len(list((run.run_dir / "items").glob("item-*.parquet"))) == n_item_files  # nothing rescored
    pd.testing.assert_frame_equal(pd.read_parquet(run.run_dir / "items.parquet"), first)


def test_steerability_from_python(tiny, embedded_dir, tmp_path):
    import steersweep as ss

    run, df = tiny_sweep(tiny, embedded_dir, tmp_path)
    table = ss.steerability(run.run_dir)
    assert set(table.layers) == {"1", "2+3"} and set(table.item_set) == {"sentiment_continuations", "sentiment_ab"}
    pd.testing.assert_frame_equal(table, ss.steerability(pd.read_parquet(run.run_dir / "items.parquet")))
