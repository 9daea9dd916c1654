"""`report/index.html`: the whole report in one offline page (no network, no CDN, no server).

The page holds the summary, every metric's pivot table with its heatmaps and curves (PNG inline as
base64), the runs compared (`report.compare_runs`), and every row of the table as JSON for a small
vanilla-JS completions browser (assets/report.js): pick a prompt (and, when the table holds several,
a steering variant: concept · method · mode) and see its completion at every (layers, alpha) beside
alpha 0 of the same variant and layers, with the row's metrics. With several variants every pivot and
picture comes once per variant, and the summary lists each variant's best cell and the first alpha
reaching the objective threshold. Columns the page does not know are shown as they come: text columns
with a few values become filters, numeric ones metrics, and every column appears in a row's details.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from steersweep.core.fileio import atomic_write_bytes
from steersweep.reporting.best import best_cell, describe_cell
from steersweep.reporting.plots import overview
from steersweep.reporting.tables import (
    VARIANT_COLUMNS,
    axis_name,
    layer_order,
    layers_sort_key,
    metric_columns,
    summarize,
    tidy,
    variant_columns,
    variant_label,
    variants,
)

if TYPE_CHECKING:
    from steersweep.core.config import ReportConfig
    from steersweep.reporting.tables import Section

# Text columns that identify or describe a row rather than split the grid: never offered as filters.
NOT_FACETS = {
    "run_id", "cell_id", "batch_id", "prompt_id", "prompt", "completion", "worker", "hook_name",
    "vector_id", "stop_reason", "layers",
}  # fmt: skip
MAX_FACET_VALUES = 30  # a text column with more distinct values is shown, not filtered on


def _plain(v: object) -> object:
    """A cell as JSON can hold it: NaN -> null, +-inf -> "inf"/"-inf", numpy scalars -> Python."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def page_data(runs: Sequence[tuple[str, pd.DataFrame]]) -> dict:
    """The rows the browser shows, column by column (prompt texts once, by prompt_id).

    Args:
        runs: (run folder name, its table) for the report's run and each compared run.

    Returns:
        `{"n": rows, "columns": {name: [values]}, "prompts": {id: text}, "metrics": [...],
        "facets": {column: [values]}, "layer_order": [labels], "variants": [labels],
        "variant_columns": [...], "row_variant": [index into variants, per row]}`; a `run` column
        names each row's run folder when there are several; a `layers` column is derived from
        `layer` for older tables. With one variant, `variants` holds one label; with several,
        concept/method/mode are not offered as separate filters (the variant filter replaces them).
    """
    frames = [f.assign(run=name) if len(runs) > 1 else f for name, f in runs]
    raw = pd.concat(frames, ignore_index=True)
    df = raw.copy()
    t = tidy(raw[[c for c in raw.columns if c in {"layer", "layers", *VARIANT_COLUMNS}]])
    df["layers"] = t["layers"]
    keys = [k for k in ("run", "model", "prompt_id", "sample", "layer", "alpha") if k in df]
    order = df.sort_values(keys, kind="stable").index
    df, t = df.loc[order].reset_index(drop=True), t.loc[order].reset_index(drop=True)
    vcols = variant_columns(t)
    found = variants(t)
    labels = [variant_label(v) for v in found]
    index = {v: i for i, v in enumerate(found)}
    row_variant = [index[v] for v in t[vcols].itertuples(index=False, name=None)] if vcols else [0] * len(t)
    prompts = {str(k): str(v) for k, v in df.groupby("prompt_id", sort=True)["prompt"].first().items()}
    shown = [c for c in df.columns if c != "prompt"]
    columns = {c: [_plain(v) for v in df[c].astype(object)] for c in shown}
    facets = {}
    for c in shown:
        if c in NOT_FACETS or pd.api.types.is_numeric_dtype(df[c]) or (len(found) > 1 and c in vcols):
            continue
        values = sorted({str(v) for v in columns[c] if v is not None})
        if 2 <= len(values) <= MAX_FACET_VALUES:
            facets[c] = values
    return {
        "n": len(df), "columns": columns, "prompts": prompts, "metrics": metric_columns(df), "facets": facets,
        "layer_order": layer_order(df["layers"]), "variants": labels, "row_variant": row_variant,
        "variant_columns": vcols,
    }  # fmt: skip


def embed_json(obj: object) -> str:
    """JSON safe inside a <script> element: `<`, `>` and `&` escaped, so `</script>` or `<!--` in a
    completion cannot end the element early; NaN is refused (JSON.parse would reject it)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(p: pd.DataFrame) -> str:
    return p.to_html(escape=True, na_rep="", border=0, classes="pivot")


def _frame(t: pd.DataFrame) -> str:
    return t.to_html(escape=True, na_rep="", border=0, classes="pivot", index=False)


def _best_text(best: pd.Series | None, rule: str, objective: str, show_variant: bool = False) -> str:
    if best is None:
        return f"None: {html.escape(rule)}."
    return (
        f"By <b>{html.escape(objective)}</b> with {html.escape(rule)}: <b>{html.escape(describe_cell(best, show_variant))}"
        f"</b> ({html.escape(objective)} = {best.objective:.3f} ± {best.ci95:.3f}, model "
        f"{html.escape(str(best.model))})."
    )


def compare_section(runs: Sequence[tuple[str, pd.DataFrame]], cfg: ReportConfig) -> str:
    """Runs side by side: one line per run, then per metric a ([variant,] layers, alpha) x run pivot.

    Variants (concept · method · mode) stay apart: a row of a pivot is one variant's cell.
    """
    multi = len(variants(pd.concat([f for _, f in runs], ignore_index=True))) > 1
    models = any(f["model"].nunique() > 1 for _, f in runs)
    parts = ['<section id="compare"><h2>Runs compared</h2>', "<table class='pivot'><tr><th>run</th>"]
    parts.append("<th>rows</th><th>models</th><th>layers</th><th>alphas</th><th>best cell</th></tr>")
    for name, f in runs:
        best, rule = best_cell(f, cfg)
        cells = [
            name, str(len(f)), ", ".join(sorted(map(str, f.model.unique()))),
            ", ".join(layer_order(tidy(f[[c for c in f.columns if c in ("layer", "layers")]])["layers"])),
            ", ".join(f"{x:g}" for x in sorted(f.alpha.unique())),
        ]  # fmt: skip
        row = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        parts.append(f"<tr>{row}<td>{_best_text(best, rule, cfg.objective, multi)}</td></tr>")
    parts.append("</table>")
    metrics = sorted(set.intersection(*(set(metric_columns(f)) for _, f in runs)))
    for metric in metrics:
        per_run = []
        for name, f in runs:
            s = summarize(f, metric)
            label = f"{name} ({', '.join(sorted(map(str, s.model.unique())))})"
            vcols = variant_columns(s)
            s = s.assign(
                variant=[variant_label(v) for v in s[vcols].itertuples(index=False, name=None)] if vcols else "",
                cell=[f"{m:.3g} ± {c:.2g}" for m, c in zip(s["mean"], s["ci95"], strict=True)],
            )
            keys = [*(["variant"] if multi else []), *(["model"] if models else []), "layers", "alpha"]
            per_run.append(s.groupby(keys, sort=False)["cell"].first().rename(label))
        p = pd.concat(per_run, axis=1)
        p = p.sort_index(key=lambda ix: ix.map(layers_sort_key) if ix.name == "layers" else ix)
        p = p.rename_axis(index={"layers": axis_name(p.index.get_level_values("layers"))})
        parts += [f"<h3>{html.escape(metric)}</h3>", _table(p)]
    parts.append("</section>")
    return "\n".join(parts)


def write_html(
    path: Path,
    title: str,
    runs: Sequence[tuple[str, pd.DataFrame]],
    cfg: ReportConfig,
    best: tuple[pd.Series | None, str],
    sections: Sequence[Section],
    tables: Sequence[tuple[str, str, pd.DataFrame]] = (),
) -> Path:
    """Write the one-page report (atomically) and return its path.

    Args:
        path: where index.html goes (report/ of the first run folder).
        title: the page title (the runs' folder names).
        runs: (folder name, table) per run, the report's own first: the summary, best cell and
            sections are its alone; the others join the completions browser and "Runs compared".
        cfg: the report settings (objective, fluency constraint).
        best: `reporting.best_cell(own rows, cfg)`.
        sections: per metric, what summary.md shows (interval note; per variant a pivot and PNGs).
        tables: (title, note, table) shown in the summary: `reporting.variant_tables` (several
            variants only).
    """
    assets = files("steersweep") / "assets"
    t = html.escape(title)
    nav = ["<a href='#summary'>Summary</a>", "<a href='#browser'>Completions</a>"]
    nav += [f"<a href='#metric-{html.escape(s.metric)}'>{html.escape(s.metric)}</a>" for s in sections]
    if len(runs) > 1:
        nav.append("<a href='#compare'>Runs compared</a>")
    others = ", ".join(name for name, _ in runs[1:])
    own = (
        f"<p class='note'>Summary and metric tables: {html.escape(runs[0][0])} only; "
        f"<a href='#compare'>Runs compared</a> puts {html.escape(others)} beside it.</p>"
    )
    body = [
        f"<header><h1>{t}</h1><nav>{' · '.join(nav)}</nav></header>",
        "<section id='summary'><h2>Summary</h2>",
        f"<p>{html.escape(overview(runs[0][1]))}</p>",
        *([own] if len(runs) > 1 else []),
        f"<p id='best'>Best cell: {_best_text(*best, cfg.objective, bool(tables))}</p>",
    ]
    for i, (name, note, table) in enumerate(tables):
        tid = "best-per-variant" if i == 0 else "first-reaching"
        body += [f"<h3>{html.escape(name)}</h3>", f"<p class='note'>{html.escape(note)}</p>",
                 f"<div id='{tid}'>{_frame(table)}</div>"]  # fmt: skip
    body += [
        "</section>",
        "<section id='browser'><h2>Completions</h2>",
        "<p class='note'>Pick a prompt; click a cell for its completion beside alpha 0 of the same variant and "
        "layers, with all of the row's columns. Cells are shaded by the metric chosen.</p>",
        "<div id='controls'></div><div id='grid'></div><div id='detail'></div></section>",
    ]
    for s in sections:
        body += [
            f"<section id='metric-{html.escape(s.metric)}'><h2>{html.escape(s.metric)}</h2>",
            f"<p class='note'>{html.escape(s.note)}</p>",
        ]
        for f in s.facets:
            if f.variant:
                body.append(f"<h3 class='variant'>{html.escape(f.variant)}</h3>")
            body += [
                _table(f.pivot),
                "<div class='plots'>" + "".join(_img(p, f"{s.metric}: {p.stem}") for p in f.images) + "</div>",
            ]
        body.append("</section>")
    if len(runs) > 1:
        body.append(compare_section(runs, cfg))
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            "<html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{t}</title>",
            f"<style>{(assets / 'report.css').read_text()}</style></head><body>",
            *body,
            f"<script type='application/json' id='sweep-data'>{embed_json(page_data(runs))}</script>",
            f"<script>{(assets / 'report.js').read_text()}</script>",
            "</body></html>",
        ]
    )
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path
