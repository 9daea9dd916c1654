"""Tables and pictures of a finished sweep, computed from the Parquet table alone.

For each metric: a layer x alpha pivot of the mean with a 95% interval (across prompts; for
behavior_prob across behaviour items) as CSV and Markdown, a heatmap, and per-layer curves over
alpha. A Markdown summary names the best (layer, alpha) by the configured objective, subject to a
fluency constraint, and shows example completions next to the unsteered ones. `index.html` holds all
of it in one offline page, with a completions browser (report_html.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .config import ReportConfig  # noqa: E402
from .results import FIXED, ResultsError  # noqa: E402

NOT_METRICS = set(FIXED) | {"behavior_prob_sem", "next_token_kl_sem"}
# Metrics whose interval comes from a stored standard error (same value on every prompt's row).
SEM_COLUMNS = {"behavior_prob": "behavior_prob_sem", "next_token_kl": "next_token_kl_sem"}


def interval_note(metric: str) -> str:
    """What a metric's ± interval is taken over (behavior_prob's comes from its behaviour items)."""
    across = "behaviour items" if metric == "behavior_prob" else "prompts"
    return f"Mean ± 95% interval across {across} (rows: layer, columns: alpha)."


def metric_columns(df: pd.DataFrame) -> list[str]:
    cols = [c for c in df.columns if c not in NOT_METRICS and pd.api.types.is_numeric_dtype(df[c])]
    return sorted(cols)


def summarize(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (model, layer, alpha): mean, 95% half-width, n prompts."""
    g = df.groupby(["model", "layer", "alpha"])[metric]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    if metric in SEM_COLUMNS and SEM_COLUMNS[metric] in df:
        sem = df.groupby(["model", "layer", "alpha"])[SEM_COLUMNS[metric]].first().values
        out["ci95"] = 1.96 * sem
    else:
        out["ci95"] = 1.96 * out["std"].fillna(0) / np.sqrt(out["n"].clip(lower=1))
    return out.drop(columns="std")


def pivot_text(s: pd.DataFrame) -> pd.DataFrame:
    s = s.assign(cell=[f"{m:.3g} ± {c:.2g}" for m, c in zip(s["mean"], s["ci95"], strict=True)])
    return s.pivot_table(index=["model", "layer"], columns="alpha", values="cell", aggfunc="first")


def markdown_table(p: pd.DataFrame) -> str:
    """A pivot as a Markdown table (no tabulate dependency)."""
    head = ["model", "layer"] + [f"α={a:g}" for a in p.columns]
    rows = [[str(m), str(layer)] + [str(v) for v in vals] for (m, layer), vals in zip(p.index, p.values, strict=True)]
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])


def heatmap(s: pd.DataFrame, metric: str, model: str, path: Path) -> None:
    p = s[s.model == model].pivot(index="layer", columns="alpha", values="mean")
    fig, ax = plt.subplots(figsize=(1.1 * p.shape[1] + 2.5, 0.5 * p.shape[0] + 2))
    vals = p.values[np.isfinite(p.values)]
    # Perplexity-like metrics span orders of magnitude: colour them on a log scale.
    log = len(vals) > 0 and vals.min() > 0 and vals.max() / vals.min() > 20
    norm = matplotlib.colors.LogNorm(vals.min(), vals.max()) if log else None
    im = ax.imshow(p.values, aspect="auto", cmap="viridis", origin="lower", norm=norm)
    ax.set_xticks(range(p.shape[1]), [f"{a:g}" for a in p.columns])
    ax.set_yticks(range(p.shape[0]), [str(i) for i in p.index])
    ax.set_xlabel("steering strength alpha")
    ax.set_ylabel("layer")
    ax.set_title(f"{metric}: mean over prompts ({model})" + (", log colour scale" if log else ""))
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


def curves(s: pd.DataFrame, metric: str, model: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for layer, g in s[s.model == model].groupby("layer"):
        g = g.sort_values("alpha")
        ax.plot(g["alpha"], g["mean"], marker="o", label=f"layer {layer}")
        ax.fill_between(g["alpha"], g["mean"] - g["ci95"], g["mean"] + g["ci95"], alpha=0.15)
    ax.set_xlabel("steering strength alpha")
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.set_title(f"{metric} vs alpha per layer ({model})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overview(df: pd.DataFrame) -> str:
    """One sentence: how many completions over which models, layers, alphas and prompts."""
    return (
        f"{len(df)} completions; models {', '.join(sorted(df.model.unique()))}; "
        f"layers {', '.join(str(int(x)) for x in sorted(df.layer.unique()))}; "
        f"alphas {', '.join(f'{x:g}' for x in sorted(df.alpha.unique()))}; {df.prompt_id.nunique()} prompts."
    )


@dataclass
class Section:
    """One metric's part of the report: what its interval is over, its pivot, its pictures."""

    metric: str
    note: str
    pivot: pd.DataFrame  # (model, layer) x alpha, cells "mean ± ci95"
    images: list[Path]  # heatmap and curves PNGs, per model


def best_cell(df: pd.DataFrame, cfg: ReportConfig) -> tuple[pd.Series | None, str]:
    """Highest objective mean among cells whose fluency stays within the allowed rise over alpha 0."""
    if cfg.objective not in df:
        return None, f"objective {cfg.objective!r} is not a column of this table"
    obj = summarize(df, cfg.objective).rename(columns={"mean": "objective"})
    rule = "no fluency constraint"
    if cfg.fluency_metric in df:
        flu = summarize(df, cfg.fluency_metric)[["model", "layer", "alpha", "mean"]].rename(columns={"mean": "fluency"})
        obj = obj.merge(flu, on=["model", "layer", "alpha"])
        base = df[df.alpha == 0].groupby("model")[cfg.fluency_metric].mean()
        if len(base):
            limit = obj["model"].map(base) * (1 + cfg.max_fluency_increase)
            obj = obj[obj["fluency"] <= limit]
            rule = f"{cfg.fluency_metric} at most {1 + cfg.max_fluency_increase:.2f} x its alpha-0 value"
    obj = obj[obj["alpha"] != 0]  # the baseline is what steering is compared with, not a candidate
    if obj.empty:
        return None, f"no steered cell satisfies {rule}"
    return obj.sort_values("objective", ascending=False).iloc[0], rule


def write_report(run_dirs: str | Path | list, cfg: ReportConfig | None = None) -> Path:
    """Write `report/` (tables, PNGs, summary.md, index.html) into the first run folder; return summary.md.

    Args:
        run_dirs: a run folder with a merged results.parquet, or several (the first holds the report;
            the others are compared with it, as `report.compare_runs` asks).
        cfg: objective and fluency constraint for the best cell (default `ReportConfig()`).

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
    df = pd.concat(frames, ignore_index=True)
    out = dirs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = f"Steering sweep report: {', '.join(d.name for d in dirs)}"
    lines = [f"# {title}", "", overview(df), ""]
    best, rule = best_cell(df, cfg)
    lines.append("## Best cell")
    if best is not None:
        lines.append(
            f"By **{cfg.objective}** with {rule}: **layer {best.layer}, alpha {best.alpha:g}** "
            f"({cfg.objective} = {best.objective:.3f} ± {best.ci95:.3f}, model {best.model})."
        )
    else:
        lines.append(f"None: {rule}.")
    lines.append("")
    sections = []
    for metric in metric_columns(df):
        s = summarize(df, metric)
        s.to_csv(out / f"table_{metric}.csv", index=False)
        pivot = pivot_text(s)
        lines += [f"## {metric}", "", interval_note(metric), ""]
        lines.append(markdown_table(pivot))
        lines.append("")
        images = []
        for model in s.model.unique():
            tag = f"{metric}_{model}".replace("/", "_")
            heatmap(s, metric, model, out / f"heatmap_{tag}.png")
            curves(s, metric, model, out / f"curves_{tag}.png")
            lines.append(f"![{metric} heatmap](heatmap_{tag}.png) ![{metric} curves](curves_{tag}.png)")
            images += [out / f"heatmap_{tag}.png", out / f"curves_{tag}.png"]
        lines.append("")
        sections.append(Section(metric, interval_note(metric), pivot, images))
    lines += ["## Example completions", ""]
    if best is not None:
        first = df.prompt_id.iloc[0]
        ex = df[(df.prompt_id == first) & (df.layer == best.layer) & (df.alpha.isin([0.0, best.alpha]))]
        for _, r in ex.sort_values("alpha").iterrows():
            lines.append(f"- alpha {r.alpha:g}, layer {r.layer}: *{r.prompt}* → {r.completion!r}")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    from .report_html import write_html

    runs = [(d.name, f) for d, f in zip(dirs, frames, strict=True)]
    write_html(out / "index.html", title, df, runs, cfg, (best, rule), sections)
    return path
