"""Tables of a finished sweep, computed from the Parquet table alone (pictures: `plots`, the folder: `write`).

The grid is (layer set, alpha): a cell steers the layers of its `layers` label ("10", "10+14", "all";
tables written before that column existed get `str(layer)`). A steering *variant* is the vector's
(concept, method, mode); when a table holds several, every table and picture is made per variant and
never averages variants together.

For each metric: a layers x alpha pivot of the mean with a 95% interval (across prompts; for
behavior_prob across behaviour items) as CSV and Markdown, a heatmap, and per-layer-set curves over
alpha. A Markdown summary names the best (variant, layers, alpha) by the configured objective,
subject to a fluency constraint, and shows example completions next to the unsteered ones; with
several variants it also lists each variant's best cell and the first alpha reaching the objective
threshold. `index.html` holds all of it in one offline page, with a completions browser
(html.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from steersweep.runs.folder import FIXED

NOT_METRICS = set(FIXED) | {"behavior_prob_sem", "next_token_kl_sem", "layers"}
# Metrics whose interval comes from a stored standard error (same value on every prompt's row).
SEM_COLUMNS = {"behavior_prob": "behavior_prob_sem", "next_token_kl": "next_token_kl_sem"}
# What tells steering variants apart; a table may lack any of them (one constant value).
VARIANT_COLUMNS = ("concept", "method", "mode")
VARIANT_SEP = " · "


# ---------------------------------------------------------------------------------------------
# Layer-set labels and variants


def _wrapped(title: str, width: int = 58) -> str:
    """A plot title in lines that fit the figure (long variant names were cut at its edge)."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


def layers_sort_key(label: object) -> tuple:
    """Natural order of layer-set labels: by first layer, then set size; "all" last.

    "6" < "10" < "10+14" < "10+12+14" < "14" < "all"; a label without a number sorts after the
    numbered ones and before "all".
    """
    text = str(label).strip()
    if text.lower() == "all":
        return (2, 0, 0, (), text)
    nums = tuple(int(x) for x in re.findall(r"\d+", text))
    if not nums:
        return (1, 0, 0, (), text)
    return (0, nums[0], len(nums), nums, text)


def layer_order(labels: Iterable[object]) -> list[str]:
    """The distinct labels (as strings), in natural order (`layers_sort_key`)."""
    return sorted({str(x) for x in labels}, key=layers_sort_key)


def is_single_layer(label: object) -> bool:
    """Whether a layer-set label names one layer ("10"), not a set ("10+14", "all")."""
    return str(label).strip().isdigit()


def axis_name(labels: Iterable[object]) -> str:
    """The grid axis's name: "layer" when every label is one layer (as before sets), else "layers"."""
    return "layer" if all(is_single_layer(x) for x in labels) else "layers"


def layers_words(label: object) -> str:
    """The cell's layers in words: "layer 10" for one layer, "layers 10+14" / "layers all" for a set."""
    return f"layer {label}" if is_single_layer(label) else f"layers {label}"


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with a string `layers` column and no missing variant values.

    `layers` is derived as `str(layer)` where the table (or a row, in runs concatenated with older
    ones) has none; `layer` from the label's first number where only `layers` exists. Missing
    concept/method/mode values become "" so that grouping keeps their rows.
    """
    out = df.copy()
    if "layer" not in out and "layers" in out:
        first = out["layers"].astype(str).str.extract(r"(\d+)", expand=False)
        out["layer"] = pd.to_numeric(first, errors="coerce")
    derived = out["layer"].map(lambda x: "" if pd.isna(x) else str(int(x)))
    if "layers" in out:
        given = out["layers"].astype(object)
        out["layers"] = given.where(given.notna() & (given.astype(str) != ""), derived).astype(str)
    else:
        out["layers"] = derived.astype(str)
    for c in VARIANT_COLUMNS:
        if c in out:
            out[c] = out[c].astype(object).where(out[c].notna(), "").astype(str)
    return out


def variant_columns(df: pd.DataFrame) -> list[str]:
    """The variant columns (concept, method, mode) the table has."""
    return [c for c in VARIANT_COLUMNS if c in df]


def variant_label(values: Iterable[object]) -> str:
    """A variant's name: its non-empty values joined, e.g. "sentiment · pca_diff · ablate_add"."""
    parts = [str(v) for v in values if v is not None and str(v) != "" and not pd.isna(v)]
    return VARIANT_SEP.join(parts) or "(no variant)"


def variants(df: pd.DataFrame) -> list[tuple]:
    """The distinct variants of a table as tuples over `variant_columns(df)`, sorted."""
    cols = variant_columns(df)
    if not cols:
        return [()]
    t = tidy(df[[c for c in df.columns if c in {*cols, "layer", "layers"}]])
    return sorted(set(t[cols].itertuples(index=False, name=None)))


def split_variants(s: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(variant label, rows) per variant of a tidy table or summary; label "" when there is one."""
    cols = variant_columns(s)
    keys = sorted(set(s[cols].itertuples(index=False, name=None))) if cols else [()]
    if len(keys) <= 1:
        yield "", s
        return
    for key in keys:
        mask = np.logical_and.reduce([s[c] == v for c, v in zip(cols, key, strict=True)])
        yield variant_label(key), s[mask]


def _natural(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Rows sorted by `by`, with any `layers` among them in natural order (stable)."""
    key = lambda col: col.map(layers_sort_key) if col.name == "layers" else col  # noqa: E731
    return frame.sort_values(by, key=key, kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Summaries


def interval_note(metric: str, rows: str = "layer") -> str:
    """What a metric's ± interval is taken over (behavior_prob's comes from its behaviour items).

    `rows` names the table's rows: "layer", or "layers" when the grid has layer sets.
    """
    across = "behaviour items" if metric == "behavior_prob" else "prompts"
    return f"Mean ± 95% interval across {across} (rows: {rows}, columns: alpha)."


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The numeric columns that are metrics (not grid coordinates or bookkeeping)."""
    cols = [c for c in df.columns if c not in NOT_METRICS and pd.api.types.is_numeric_dtype(df[c])]
    return sorted(cols)


def group_keys(df: pd.DataFrame) -> list[str]:
    """What a summary groups by: model, the variant columns present, layers, alpha."""
    return ["model", *variant_columns(df), "layers", "alpha"]


def summarize(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (model, concept, method, mode, layers, alpha): mean, 95% half-width, n prompts.

    Variant columns the table lacks are left out; variants are never averaged together. `layer` is
    the cell's first layer; rows come in natural layers order.
    """
    sem = SEM_COLUMNS.get(metric) if SEM_COLUMNS.get(metric) in df else None
    keep = [c for c in df.columns if c in {*group_keys(df), "layer", metric, sem}]
    d = tidy(df[keep])
    keys = group_keys(d)
    g = d.groupby(keys, sort=True)
    out = g.agg(layer=("layer", "min"), mean=(metric, "mean"), std=(metric, "std"), n=(metric, "count"))
    if sem:
        out["ci95"] = 1.96 * g[sem].first()
    else:
        out["ci95"] = 1.96 * out["std"].fillna(0) / np.sqrt(out["n"].clip(lower=1))
    return _natural(out.drop(columns="std").reset_index(), keys)


def pivot_text(s: pd.DataFrame) -> pd.DataFrame:
    """A summary as (model[, variant columns that vary], layers) x alpha cells "mean ± ci95".

    The layers level is called "layer" when every label is one layer (the table looks as before
    layer sets), and comes in natural order.
    """
    s = s.assign(cell=[f"{m:.3g} ± {c:.2g}" for m, c in zip(s["mean"], s["ci95"], strict=True)])
    varying = [c for c in variant_columns(s) if s[c].nunique() > 1]
    p = s.pivot_table(index=["model", *varying, "layers"], columns="alpha", values="cell", aggfunc="first")
    p = p.sort_index(key=lambda ix: ix.map(layers_sort_key) if ix.name == "layers" else ix)
    return p.rename_axis(index={"layers": axis_name(s["layers"])})


def markdown_frame(p: pd.DataFrame, index: bool = True) -> str:
    """A DataFrame as a Markdown table (no tabulate dependency); alpha columns read "α=<a>"."""
    cols = [f"α={c:g}" if isinstance(c, (int, float)) and not isinstance(c, bool) else str(c) for c in p.columns]
    names = [str(n) for n in p.index.names] if index else []
    head = names + cols
    rows = []
    for ix, vals in zip(p.index, p.values, strict=True):
        keys = (list(ix) if isinstance(ix, tuple) else [ix]) if index else []
        rows.append([str(k) for k in keys] + ["" if v is None else str(v) for v in vals])
    esc = lambda c: c.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join("| " + " | ".join(map(esc, r)) + " |" for r in [head, ["---"] * len(head), *rows])


def markdown_table(p: pd.DataFrame) -> str:
    """A pivot as a Markdown table (no tabulate dependency)."""
    return markdown_frame(p)


@dataclass
class Facet:
    """One variant's pivot and pictures of a metric (variant "" when the table has one)."""

    variant: str
    pivot: pd.DataFrame  # (model, layers) x alpha, cells "mean ± ci95"
    images: list[Path] = field(default_factory=list)  # heatmap and curves PNGs, per model


@dataclass
class Section:
    """One metric's part of the report: what its interval is over, then per variant a pivot and pictures."""

    metric: str
    note: str
    facets: list[Facet]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
