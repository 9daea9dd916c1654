"""Plots: per-metric heatmaps (layer x alpha) and alpha curves, and the overview line."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from steersweep.reporting.tables import (
    VARIANT_COLUMNS,
    _wrapped,
    axis_name,
    layer_order,
    layers_words,
    tidy,
    variant_columns,
    variant_label,
    variants,
)

matplotlib.use("Agg")


def heatmap(s: pd.DataFrame, metric: str, model: str, path: Path, variant: str = "") -> None:
    """A layers x alpha heatmap of one model's (and one variant's) means."""
    p = s[s.model == model].pivot(index="layers", columns="alpha", values="mean")
    p = p.reindex(layer_order(p.index))
    fig, ax = plt.subplots(figsize=(1.1 * p.shape[1] + 2.5, 0.5 * p.shape[0] + 2))
    vals = p.values[np.isfinite(p.values)]
    # Perplexity-like metrics span orders of magnitude: colour them on a log scale.
    log = len(vals) > 0 and vals.min() > 0 and vals.max() / vals.min() > 20
    norm = matplotlib.colors.LogNorm(vals.min(), vals.max()) if log else None
    im = ax.imshow(p.values, aspect="auto", cmap="viridis", origin="lower", norm=norm)
    ax.set_xticks(range(p.shape[1]), [f"{a:g}" for a in p.columns])
    ax.set_yticks(range(p.shape[0]), [str(i) for i in p.index])
    ax.set_xlabel("steering strength alpha")
    ax.set_ylabel(axis_name(p.index))
    where = f"{variant}; {model}" if variant else model
    ax.set_title(_wrapped(f"{metric}: mean over prompts ({where})" + (", log colour scale" if log else "")))
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            v = p.values[i, j]
            if not math.isnan(v):
                ink = "black" if im.norm(v) > 0.6 else "white"  # readable on light and dark cells
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", color=ink, fontsize=8)
    fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves(s: pd.DataFrame, metric: str, model: str, path: Path, variant: str = "") -> None:
    """One line over alpha per layer set, with its 95% band, for one model (and one variant)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    mine = s[s.model == model]
    for label in layer_order(mine["layers"]):
        g = mine[mine["layers"] == label].sort_values("alpha")
        ax.plot(g["alpha"], g["mean"], marker="o", label=layers_words(label))
        ax.fill_between(g["alpha"], g["mean"] - g["ci95"], g["mean"] + g["ci95"], alpha=0.15)
    ax.set_xlabel("steering strength alpha")
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    where = f"{variant}; {model}" if variant else model
    per = "layer" if axis_name(mine["layers"]) == "layer" else "layer set"
    ax.set_title(_wrapped(f"{metric} vs alpha per {per} ({where})"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overview(df: pd.DataFrame) -> str:
    """One sentence: how many completions over which models, layers, alphas, prompts (and variants)."""
    t = tidy(df[[c for c in df.columns if c in {"model", "layer", "layers", *VARIANT_COLUMNS}]])
    text = (
        f"{len(df)} completions; models {', '.join(sorted(df.model.unique()))}; "
        f"layers {', '.join(layer_order(t['layers']))}; "
        f"alphas {', '.join(f'{x:g}' for x in sorted(df.alpha.unique()))}; {df.prompt_id.nunique()} prompts."
    )
    vs = variants(t)
    if len(vs) > 1:
        cols = " · ".join(variant_columns(t))
        text += f" {len(vs)} variants ({cols}): {'; '.join(variant_label(v) for v in vs)}."
    return text
