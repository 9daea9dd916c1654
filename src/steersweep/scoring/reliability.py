"""Steerability: does a vector move every behaviour item, or only the mean? (Tan et al. 2024, arXiv 2407.12404)

From the item table (`items.parquet`: per behaviour item, its propensity = logp(matching) - logp(other)
at every alpha of a setting), per (concept, method, mode, layer set, item set):

- each item's least-squares slope of propensity against alpha (its steerability);
- over items: the mean slope with a 95% interval (normal approximation, 1.96 standard errors, as the
  report's other intervals), the share of anti-steerable items (slope < 0: they move against the
  concept direction as alpha grows), and the median slope;
- the Spearman correlation of alpha and propensity over every (item, alpha) point;
- how linear the response is: the root-mean-square residual of the items' fits, and R^2 (the share of
  the propensity's variance around each item's own mean that the item's line explains).

No generation is needed: a sweep's behaviour scoring already computes every number.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

SETTING = ["concept", "method", "mode", "layers", "item_set"]
COLUMNS = [
    *SETTING, "layer", "n_items", "n_alphas", "mean_slope", "slope_ci_low", "slope_ci_high", "median_slope",
    "anti_steerable", "spearman", "residual_rms", "r2",
]  # fmt: skip


def item_slopes(items: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, item): the least-squares slope of propensity against alpha, and the fit's squared
    residuals summed (`sse`) and the propensity's squared deviations from the item's mean (`sst`)."""
    df = items[[*SETTING, "layer", "item_id", "alpha", "propensity"]].copy()
    keys = [*SETTING, "item_id"]
    g = df.groupby(keys, sort=False)
    da = df.alpha - g.alpha.transform("mean")
    dy = df.propensity - g.propensity.transform("mean")
    df["sxy"], df["sxx"], df["syy"] = da * dy, da * da, dy * dy
    per = df.groupby(keys, sort=False).agg(
        layer=("layer", "first"), n=("alpha", "size"), sxy=("sxy", "sum"), sxx=("sxx", "sum"), sst=("syy", "sum")
    )
    per["slope"] = per.sxy / per.sxx.where(per.sxx > 0)
    per["sse"] = (per.sst - per.slope * per.sxy).clip(lower=0)
    return per.reset_index()


def steerability(items: pd.DataFrame) -> pd.DataFrame:
    """The steerability table (see the module docstring), one row per setting with two or more alphas."""
    if items.empty:
        return pd.DataFrame(columns=COLUMNS)
    per = dict(iter(item_slopes(items).dropna(subset=["slope"]).groupby(SETTING, sort=False)))
    rows = []
    for key, pts in items.groupby(SETTING, sort=False):
        if key not in per:  # one alpha: no slope
            continue
        g = per[key]
        pts = pts[pts.item_id.isin(g.item_id)]
        n, slopes = len(g), g.slope.to_numpy()
        mean = float(slopes.mean())
        half = 1.96 * float(slopes.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
        sst = float(g.sst.sum())
        rows.append({
            **dict(zip(SETTING, key, strict=True)), "layer": int(g.layer.iloc[0]), "n_items": n,
            "n_alphas": int(pts.alpha.nunique()), "mean_slope": mean, "slope_ci_low": mean - half,
            "slope_ci_high": mean + half, "median_slope": float(np.median(slopes)),
            "anti_steerable": float((slopes < 0).mean()),
            "spearman": float(pts.alpha.corr(pts.propensity, method="spearman")),
            "residual_rms": math.sqrt(float(g.sse.sum()) / len(pts)),
            "r2": 1 - float(g.sse.sum()) / sst if sst > 0 else math.nan,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(
        ["concept", "method", "mode", "item_set", "layer", "layers"], kind="stable", ignore_index=True
    )


def most_steerable(table: pd.DataFrame) -> pd.Series | None:
    """The layer set a report recommends on one item set: the highest lower bound of the mean slope (reliably
    positive, not just large), ties to the fewer anti-steerable items. None when no slope is positive."""
    ok = table[table.slope_ci_low.fillna(table.mean_slope) > 0]
    if ok.empty:
        return None
    lower = ok.slope_ci_low.fillna(ok.mean_slope)
    return ok.assign(_lower=lower).sort_values(["_lower", "anti_steerable"], ascending=[False, True]).iloc[0]
