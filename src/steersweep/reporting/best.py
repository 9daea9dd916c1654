"""The best cells: per metric and variant, the cell that best meets the report's objective, and the
first alpha reaching it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from steersweep.core.config import ReportConfig
from steersweep.reporting.tables import _natural, group_keys, layers_words, summarize, variant_columns, variant_label

# Default objective level of `first_alpha_reaching` ("which variant reaches behaviour 0.9 ...").
OBJECTIVE_THRESHOLD = 0.9


# ---------------------------------------------------------------------------------------------
# Best cells


def _candidates(df: pd.DataFrame, cfg: ReportConfig) -> tuple[pd.DataFrame | None, str]:
    """Every (model, variant, layers, alpha) cell with its objective, fluency and fluency increase.

    `fluency_increase` is the fluency metric's relative rise over alpha 0 of the same model, variant
    and layers (over the model's alpha-0 rows where that cell set has none: alpha 0 is the
    unsteered model in every mode); `ok` says whether the cell keeps the fluency rule.
    """
    if cfg.objective not in df:
        return None, f"objective {cfg.objective!r} is not a column of this table"
    obj = summarize(df, cfg.objective).rename(columns={"mean": "objective"})
    keys = group_keys(obj)
    obj["fluency"] = np.nan
    obj["fluency_increase"] = np.nan
    obj["ok"] = True
    rule = "no fluency constraint"
    if cfg.fluency_metric in df:
        flu = summarize(df, cfg.fluency_metric)[[*keys, "mean"]].rename(columns={"mean": "fluency"})
        obj = obj.drop(columns="fluency").merge(flu, on=keys, how="left")
        cell = keys[:-1]  # model, variant, layers
        zero = flu[flu["alpha"] == 0]
        base = obj[cell].merge(zero[[*cell, "fluency"]].rename(columns={"fluency": "base"}), on=cell, how="left")
        pooled = df[df.alpha == 0].groupby("model")[cfg.fluency_metric].mean()
        base_value = base["base"].fillna(obj["model"].map(pooled)).to_numpy(dtype=float)
        if np.isfinite(base_value).any():
            obj["fluency_increase"] = obj["fluency"].to_numpy() / base_value - 1
            obj["ok"] = obj["fluency"].to_numpy() <= base_value * (1 + cfg.max_fluency_increase)
            rule = f"{cfg.fluency_metric} at most {1 + cfg.max_fluency_increase:.2f} x its alpha-0 value"
    vcols = variant_columns(obj)
    obj["variant"] = [variant_label(v) for v in obj[vcols].itertuples(index=False, name=None)] if vcols else ""
    return obj, rule


def best_cell(df: pd.DataFrame, cfg: ReportConfig) -> tuple[pd.Series | None, str]:
    """Highest objective mean among cells whose fluency stays within the allowed rise over alpha 0.

    Args:
        df: the results table (several variants and layer sets allowed).
        cfg: objective, fluency metric and its allowed relative rise.

    Returns:
        (the best steered cell over all variants, or None; the rule applied, in words). The cell has
        model, concept/method/mode (those in the table), variant (label), layers, layer (its first
        layer), alpha, objective, ci95, n, fluency, fluency_increase.
    """
    obj, rule = _candidates(df, cfg)
    if obj is None:
        return None, rule
    obj = obj[obj["ok"] & (obj["alpha"] != 0)]  # the baseline is what steering is compared with
    if obj.empty:
        return None, f"no steered cell satisfies {rule}"
    return obj.sort_values("objective", ascending=False, kind="stable").iloc[0].drop("ok"), rule


def best_per_variant(df: pd.DataFrame, cfg: ReportConfig) -> pd.DataFrame:
    """Each variant's best steered cell under the fluency rule of `best_cell`.

    Args:
        df: the results table.
        cfg: objective, fluency metric and its allowed relative rise.

    Returns:
        One row per (model, variant): model, the variant columns in the table, variant (label),
        layers, layer, alpha, objective, ci95, fluency_increase (the fluency metric's relative rise
        over alpha 0 of the same variant and layers). A variant with no admissible cell has NaN
        layers/alpha/objective. Empty when the objective is not a column.
    """
    obj, _ = _candidates(df, cfg)
    cols = ["model", *variant_columns(df), "variant", "layers", "layer", "alpha", "objective", "ci95",
            "fluency_increase"]  # fmt: skip
    if obj is None:
        return pd.DataFrame(columns=cols)
    who = ["model", *variant_columns(obj), "variant"]
    ok = obj[obj["ok"] & (obj["alpha"] != 0)].sort_values("objective", ascending=False, kind="stable")
    best = ok.drop_duplicates(who)
    out = obj[who].drop_duplicates().merge(best, on=who, how="left")[cols]
    return out.sort_values(who, kind="stable").reset_index(drop=True)


def first_alpha_reaching(df: pd.DataFrame, cfg: ReportConfig, threshold: float = OBJECTIVE_THRESHOLD) -> pd.DataFrame:
    """Per (model, variant, layers): the weakest steered alpha whose objective mean reaches `threshold`.

    "Weakest" is the smallest |alpha| (a tie goes to the lower alpha); the fluency rule is not
    applied: the fluency increase at that alpha is reported instead.

    Args:
        df: the results table.
        cfg: the objective and the fluency metric.
        threshold: the objective level to reach (default `OBJECTIVE_THRESHOLD`).

    Returns:
        One row per (model, variant, layers): model, the variant columns, variant, layers, layer,
        alpha (NaN: not reached), objective (at that alpha), fluency_increase (relative, over alpha
        0 of the same variant and layers), max_objective (over the steered alphas). Empty when the
        objective is not a column.
    """
    obj, _ = _candidates(df, cfg)
    who = ["model", *variant_columns(df), "variant", "layers"]
    cols = [*who, "layer", "alpha", "objective", "fluency_increase", "max_objective"]
    if obj is None:
        return pd.DataFrame(columns=cols)
    steered = obj[obj["alpha"] != 0].assign(strength=lambda f: f["alpha"].abs())
    top = steered.groupby(who, sort=False)["objective"].max().rename("max_objective").reset_index()
    hit = steered[steered["objective"] >= threshold].sort_values(["strength", "alpha"], kind="stable")
    hit = hit.drop_duplicates(who)[[*who, "alpha", "objective", "fluency_increase"]]
    first = obj.groupby(who, sort=False)["layer"].min().reset_index()
    out = first.merge(hit, on=who, how="left").merge(top, on=who, how="left")[cols]
    return _natural(out, who)


def describe_cell(cell: pd.Series, show_variant: bool = False) -> str:
    """A cell in words: "layer 10, alpha 4", "layers 10+14, alpha 4", with the variant first if asked."""
    label = cell["layers"] if "layers" in cell else cell["layer"]
    words = f"{layers_words(label)}, alpha {cell['alpha']:g}"
    return f"{cell['variant']}, {words}" if show_variant and "variant" in cell else words


def _pct(x: object) -> str:
    return "–" if x is None or pd.isna(x) else f"{100 * float(x):+.0f}%"
