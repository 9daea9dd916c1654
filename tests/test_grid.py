"""The grid (runs.grid): every method, mode and layer set once, in the cells a config asks for."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf


def grid(**steering):
    base = {"layers": [1], "alphas": [0.0, 2.0], "samples": 1, "mode": "add"}
    return OmegaConf.create(
        {
            "steering": {**base, **steering},
            "generation": {"seed": 0},
            "vectors": {"concept": "c", "method": "mean_diff"},
        }
    )


def test_the_grid_has_every_method_mode_and_layer_set_once():
    from steersweep.runs.grid import Grid, cell_key, expand, layer_sets

    prompts = [{"id": "p0", "prompt": "a"}, {"id": "p1", "prompt": "b"}]
    cfg = grid(layers=[1, [1, 3], "all"], mode=["add", "ablate"])
    cfg.vectors.method = ["mean_diff", "pca_diff"]
    cells = expand(Grid.of(cfg), prompts, "h", num_layers=4)
    assert len(cells) == 2 * 2 * 2 * 3 * 2 and len({c.cell_id for c in cells}) == len(cells)
    assert {c.label for c in cells} == {"1", "1+3", "all"}
    assert {c.steered_layers for c in cells} == {(1,), (1, 3), (0, 1, 2, 3)}
    assert len({c.setting for c in cells}) == 2 * 2 * 3 * 2 and {c.concept for c in cells} == {"c"}
    # paired comparisons: a cell samples with the same seed under every method and mode
    seeds = {}
    for c in cells:
        seeds.setdefault((c.label, c.alpha, c.prompt_id), set()).add(c.seed)
    assert all(len(s) == 1 for s in seeds.values())
    # the baseline: a prompt's alpha-0 cells (every layer set, method, mode) come first, side by side,
    # and share one seed, whatever the layer
    for p in prompts:
        mine = [c for c in cells if c.prompt_id == p["id"]]
        assert [c.alpha for c in mine[:12]] == [0.0] * 12 and 0.0 not in [c.alpha for c in mine[12:]]
        assert len({c.seed for c in mine[:12]}) == 1 and len({c.decode_key for c in mine[:12]}) == 1
    # a plain grid (single layers, one method, one mode) keeps the ids it had before these axes
    plain = expand(Grid.of(grid(layers=[1, 2])), prompts, "h")
    assert [c.cell_id for c in plain] == [
        cell_key("h", layer, alpha, p["id"], 0) for p in prompts for alpha in (0.0, 2.0) for layer in (1, 2)
    ]
    assert layer_sets([[3, 1]]) == [("1+3", (1, 3))]
    with pytest.raises(ValueError, match="needs the model's number of layers"):
        layer_sets(["all"])
