"""A synthetic results table with known effects per (method, mode, layer set), for the report's tests."""

from __future__ import annotations

import pandas as pd

METHODS = ("mean_diff", "pca_diff")


MODES = ("add", "ablate_add")


LAYER_SETS = {"10": 10, "10+14": 10}  # label -> first layer


ALPHAS = (-1.0, 0.0, 1.0, 2.0, 4.0)


# How much each variant moves behaviour per unit alpha, and what it costs in perplexity.
EFFECT = {("mean_diff", "add"): 0.10, ("mean_diff", "ablate_add"): 0.15, ("pca_diff", "add"): 0.21,
          ("pca_diff", "ablate_add"): 0.12}  # fmt: skip


COST = {("mean_diff", "add"): 0.02, ("mean_diff", "ablate_add"): 0.05, ("pca_diff", "add"): 0.30,
        ("pca_diff", "ablate_add"): 0.01}  # fmt: skip


VARIANT = ["concept", "method", "mode"]


def variant_table(n_prompts: int = 3) -> pd.DataFrame:
    """2 methods x 2 modes x layer sets "10" and "10+14" x alphas x prompts, one row each."""
    rows = []
    for method in METHODS:
        for mode in MODES:
            for label, first in LAYER_SETS.items():
                boost = 1.5 if "+" in label else 1.0
                for alpha in ALPHAS:
                    for p in range(n_prompts):
                        eff, cost = EFFECT[method, mode] * boost, COST[method, mode] * boost
                        rows.append({
                            "run_id": "r", "cell_id": f"{method}-{mode}-{label}-{alpha:g}-{p}", "model": "toy",
                            "layer": first, "layers": label, "alpha": alpha, "concept": "sentiment",
                            "method": method, "mode": mode, "sample": 0, "prompt_id": f"p{p}",
                            "prompt": f"prompt {p}", "completion": f"{method}/{mode}/{label}/{alpha:g}/p{p}",
                            "behavior_prob": min(0.3 + eff * alpha + 0.01 * p, 1.0),
                            "perplexity": 10.0 * (1 + cost * alpha**2) + 0.5 * p,
                        })  # fmt: skip
    return pd.DataFrame(rows)
