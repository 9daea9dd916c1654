"""The report folder from a run's rows: summary.md, table_*.csv, PNGs and index.html (`write_report`)."""

from __future__ import annotations

from pathlib import Path
from shlex import quote

import pandas as pd

from steersweep.core.config import ReportConfig
from steersweep.core.errors import ResultsError
from steersweep.reporting.best import (
    OBJECTIVE_THRESHOLD,
    _pct,
    best_cell,
    best_per_variant,
    describe_cell,
    first_alpha_reaching,
)
from steersweep.reporting.html import write_html
from steersweep.reporting.plots import curves, heatmap, overview
from steersweep.reporting.steerability import steerability_part
from steersweep.reporting.tables import (
    Facet,
    Section,
    axis_name,
    interval_note,
    layers_words,
    markdown_frame,
    markdown_table,
    metric_columns,
    pivot_text,
    slug,
    split_variants,
    summarize,
    tidy,
    variant_columns,
    variants,
)
from steersweep.runs.folder import RunFolder

# The report's front page in `report/` (write_report returns summary.md beside it).
PAGE = "index.html"


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
        table = RunFolder(d).results_path
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

    runs = [(d.name, f) for d, f in zip(dirs, frames, strict=True)]
    write_html(out / PAGE, title, runs, cfg, (best, rule), sections, tables)
    return path
