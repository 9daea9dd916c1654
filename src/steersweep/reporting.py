"""Tables and pictures of a finished sweep, computed from the Parquet table alone.

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
(report_html.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from shlex import quote

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .config import ReportConfig  # noqa: E402
from .results import FIXED, ResultsError  # noqa: E402

NOT_METRICS = set(FIXED) | {"behavior_prob_sem", "next_token_kl_sem", "layers"}
# Metrics whose interval comes from a stored standard error (same value on every prompt's row).
SEM_COLUMNS = {"behavior_prob": "behavior_prob_sem", "next_token_kl": "next_token_kl_sem"}
# What tells steering variants apart; a table may lack any of them (one constant value).
VARIANT_COLUMNS = ("concept", "method", "mode")
VARIANT_SEP = " · "
# Default objective level of `first_alpha_reaching` ("which variant reaches behaviour 0.9 ...").
OBJECTIVE_THRESHOLD = 0.9
# The report's front page in `report/` (write_report returns summary.md beside it).
PAGE = "index.html"


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


def variant_tables(
    df: pd.DataFrame, cfg: ReportConfig, threshold: float = OBJECTIVE_THRESHOLD
) -> list[tuple[str, str, pd.DataFrame]]:
    """The summary's per-variant tables, formatted for reading (empty with one variant).

    Returns:
        (title, note, table of strings) for `best_per_variant` and `first_alpha_reaching`.
    """
    if len(variants(df)) <= 1 or cfg.objective not in df:
        return []
    flu = f"{cfg.fluency_metric} increase"
    models = df["model"].nunique() > 1
    out = []
    best = best_per_variant(df, cfg)
    shown = pd.DataFrame(
        {
            **({"model": best["model"]} if models else {}),
            "variant": best["variant"],
            "layers": best["layers"].fillna("–"),
            "alpha": [("–" if pd.isna(a) else f"{a:g}") for a in best["alpha"]],
            cfg.objective: [
                "none admissible" if pd.isna(m) else f"{m:.3f} ± {c:.3f}"
                for m, c in zip(best["objective"], best["ci95"], strict=True)
            ],
            flu: [_pct(x) for x in best["fluency_increase"]],
        }
    )
    note = (
        f"Each variant's highest {cfg.objective} among steered cells whose {cfg.fluency_metric} stays at most "
        f"{1 + cfg.max_fluency_increase:.2f} x its alpha-0 value; {flu}: relative to alpha 0 of the same variant "
        "and layers."
    )
    out.append(("Best cell per variant", note, shown))
    first = first_alpha_reaching(df, cfg, threshold)
    reached = first["alpha"].notna()
    shown = pd.DataFrame(
        {
            **({"model": first["model"]} if models else {}),
            "variant": first["variant"],
            "layers": first["layers"],
            f"first alpha with {cfg.objective} ≥ {threshold:g}": [
                f"{a:g}" if ok else f"not reached (max {m:.3f})"
                for a, m, ok in zip(first["alpha"], first["max_objective"], reached, strict=True)
            ],
            cfg.objective: [f"{m:.3f}" if ok else "–" for m, ok in zip(first["objective"], reached, strict=True)],
            flu: [_pct(x) if ok else "–" for x, ok in zip(first["fluency_increase"], reached, strict=True)],
        }
    )
    note = (
        f"Per variant and layers: the weakest steered alpha (smallest |alpha|) whose mean {cfg.objective} reaches "
        f"{threshold:g}, and the {flu} there (no fluency constraint applied)."
    )
    out.append((f"First alpha reaching {cfg.objective} ≥ {threshold:g}", note, shown))
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def write_report(
    run_dirs: str | Path | list, cfg: ReportConfig | None = None, *, threshold: float = OBJECTIVE_THRESHOLD
) -> Path:
    """Write `report/` (tables, PNGs, summary.md, index.html) into the first run folder; return summary.md.

    Args:
        run_dirs: a run folder with a merged results.parquet, or several (the first holds the report;
            the others are compared with it, as `report.compare_runs` asks). Every table, picture,
            the best cell and the summary come from the first run's rows alone; the others appear
            beside them in index.html ("Runs compared" and the completions browser).
        cfg: objective and fluency constraint for the best cell (default `ReportConfig()`).
        threshold: the objective level of the "first alpha reaching" table (several variants only).

    Raises:
        ResultsError: a folder or its results.parquet is missing (one line saying what to run).
    """
    cfg = cfg or ReportConfig()
    dirs = [Path(d) for d in (run_dirs if isinstance(run_dirs, (list, tuple)) else [run_dirs])]
    frames = []
    for d in dirs:
        table = d / "results.parquet"
        if not d.is_dir():
            raise ResultsError(f"run folder {d} does not exist: check run_dir and report.compare_runs")
        if not table.is_file():
            raise ResultsError(f"{table} not found: run task=merge run_dir={quote(str(d))} first")
        frames.append(pd.read_parquet(table))
    # The run's own tables come from its own rows: compared runs are only put beside them, in the
    # page's "Runs compared" section and its completions browser (each row labelled by its run).
    df = frames[0]
    multi = len(variants(df)) > 1
    out = dirs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = f"Steering sweep report: {', '.join(d.name for d in dirs)}"
    lines = [f"# {title}", "", overview(df), ""]
    if len(dirs) > 1:
        others = ", ".join(d.name for d in dirs[1:])
        lines += [
            f"Tables below: {dirs[0].name} only; compared with {others} side by side in {PAGE} (Runs compared).",
            "",
        ]
    best, rule = best_cell(df, cfg)
    lines.append("## Best cell")
    if best is not None:
        lines.append(
            f"By **{cfg.objective}** with {rule}: **{describe_cell(best, multi)}** "
            f"({cfg.objective} = {best.objective:.3f} ± {best.ci95:.3f}, model {best.model})."
        )
    else:
        lines.append(f"None: {rule}.")
    lines.append("")
    tables = variant_tables(df, cfg, threshold)
    for name, note, t in tables:
        lines += [f"## {name}", "", note, "", markdown_frame(t, index=False), ""]
    sections = []
    for metric in metric_columns(df):
        s = summarize(df, metric)
        s.to_csv(out / f"table_{metric}.csv", index=False)
        note = interval_note(metric, axis_name(s["layers"]))
        lines += [f"## {metric}", "", note, ""]
        facets = []
        for variant, sv in split_variants(s):
            pivot = pivot_text(sv)
            if variant:
                lines += [f"### {variant}", ""]
            lines += [markdown_table(pivot), ""]
            images = []
            for model in sv.model.unique():
                tag = slug(f"{metric}_{model}" + (f"__{variant}" if variant else ""))
                heatmap(sv, metric, model, out / f"heatmap_{tag}.png", variant)
                curves(sv, metric, model, out / f"curves_{tag}.png", variant)
                lines.append(f"![{metric} heatmap](heatmap_{tag}.png) ![{metric} curves](curves_{tag}.png)")
                images += [out / f"heatmap_{tag}.png", out / f"curves_{tag}.png"]
            lines.append("")
            facets.append(Facet(variant, pivot, images))
        sections.append(Section(metric, note, facets))
    from .report_steerability import steerability_part  # the report's steerability (items.parquet), after its tables

    more, steer_section = steerability_part(dirs[0], out)
    lines += more
    if steer_section is not None:
        sections.append(steer_section)
    lines += ["## Example completions", ""]
    if best is not None:
        t = tidy(df)
        first = t.prompt_id.iloc[0]
        same = (t.prompt_id == first) & (t.model == best.model)
        for c in variant_columns(t):
            same &= t[c] == best[c]
        steered = t[same & (t.layers == best.layers) & (t.alpha == best.alpha)]
        base = t[same & (t.layers == best.layers) & (t.alpha == 0)]
        if base.empty:  # alpha 0 is the unsteered model in every mode: any of the prompt's will do
            base = t[(t.prompt_id == first) & (t.model == best.model) & (t.alpha == 0)].head(1)
        for _, r in pd.concat([base, steered]).sort_values("alpha", kind="stable").iterrows():
            lines.append(f"- alpha {r.alpha:g}, {layers_words(r.layers)}: *{r.prompt}* → {r.completion!r}")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    from .report_html import write_html

    runs = [(d.name, f) for d, f in zip(dirs, frames, strict=True)]
    write_html(out / PAGE, title, runs, cfg, (best, rule), sections, tables)
    return path
