"""The report's steerability part: from a run's items.parquet, the steerability table (steerability.parquet
in the run folder, steerability.csv in report/), its summary.md section and its index.html section.

Per variant (concept, method, mode) and item set: per layer set the mean slope of propensity against
alpha with its 95% interval, the share of anti-steerable items, Spearman and R^2; a plot of the slope
and the anti-steerable share per layer; and for the recommended layer set (`steerability.most_steerable`)
every item's propensity against alpha, one line per item.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from steersweep.core.fileio import atomic_write_bytes
from steersweep.reporting.tables import Facet, Section, layers_words, markdown_frame, slug, variant_label
from steersweep.runs.folder import RunFolder
from steersweep.scoring.reliability import SETTING, most_steerable, steerability

matplotlib.use("Agg")

NOTE = (
    "Per behaviour item, the least-squares slope of its propensity (log p(matching) - log p(other)) against alpha; "
    "mean slope over items with a 95% interval, the share of anti-steerable items (slope < 0), Spearman of alpha "
    "and propensity over all points, R^2 of the items' lines. Recommended: the layer set whose interval's lower "
    "bound is highest (reliably positive), ties to fewer anti-steerable items."
)
VARIANT = ["concept", "method", "mode"]


def recommendation(row: pd.Series | None, item_set: str) -> str:
    """One sentence naming the recommended layer set on an item set."""
    if row is None:
        return f"Most steerable on {item_set}: none (no layer set's mean slope is reliably above 0)."
    return (
        f"Most steerable on {item_set}: **{layers_words(row.layers)}** (mean slope {row.mean_slope:.3g} "
        f"[{row.slope_ci_low:.3g}, {row.slope_ci_high:.3g}], {row.anti_steerable:.0%} of items anti-steerable)."
    )


def display(t: pd.DataFrame) -> pd.DataFrame:
    """The table as the report shows it: one row per layer set."""
    return pd.DataFrame(
        {
            "items": t.n_items.to_numpy(),
            "mean slope [95%]": [
                f"{m:.3g} [{lo:.3g}, {hi:.3g}]"
                for m, lo, hi in zip(t.mean_slope, t.slope_ci_low, t.slope_ci_high, strict=True)
            ],  # fmt: skip
            "anti-steerable": [f"{x:.0%}" for x in t.anti_steerable],
            "Spearman": [f"{x:.2f}" for x in t.spearman],
            "R²": [f"{x:.2f}" for x in t.r2],
        },
        index=pd.Index(t.layers.to_numpy(), name="layers"),
    )


def plot_layers(t: pd.DataFrame, path: Path, title: str) -> None:
    """Mean slope with its interval, and the anti-steerable share, per layer set."""
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.5, 5.2), sharex=True)
    x = range(len(t))
    ax1.errorbar(x, t.mean_slope, yerr=[t.mean_slope - t.slope_ci_low, t.slope_ci_high - t.mean_slope],
                 fmt="o-", capsize=3)  # fmt: skip
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set_ylabel("mean slope (95%)")
    ax1.set_title(title, fontsize=9, wrap=True)
    ax2.bar(x, t.anti_steerable, color="tab:red", alpha=0.7)
    ax2.set_ylabel("anti-steerable share")
    ax2.set_ylim(0, 1)
    ax2.set_xticks(list(x), [str(v) for v in t.layers])
    ax2.set_xlabel("layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_items(items: pd.DataFrame, path: Path, title: str) -> None:
    """Every item's propensity against alpha at one layer set: one thin line per item, the mean bold."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for _, it in items.groupby("item_id"):
        it = it.sort_values("alpha")
        ax.plot(it.alpha, it.propensity, color="tab:blue", alpha=0.25, lw=0.8)
    mean = items.groupby("alpha").propensity.mean()
    ax.plot(mean.index, mean.to_numpy(), color="black", lw=2, label="mean")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("alpha")
    ax.set_ylabel("propensity (log p match - log p other)")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def steerability_part(run_dir: Path, out: Path) -> tuple[list[str], Section | None]:
    """summary.md lines and the index.html section of a run's steerability ([] and None without items)."""
    folder = RunFolder(run_dir)
    if not folder.items_path.is_file():
        return [], None
    items = pd.read_parquet(folder.items_path)
    table = steerability(items)
    if table.empty:
        return [], None
    atomic_write_bytes(folder.steerability_path, lambda tmp: table.to_parquet(tmp, index=False))
    table.to_csv(out / "steerability.csv", index=False)
    lines = ["## Steerability", "", NOTE, ""]
    facets = []
    many = table[VARIANT].drop_duplicates().shape[0] > 1
    sets = list(dict.fromkeys(table.item_set))
    for variant, tv in table.groupby(VARIANT, sort=False):
        vname = variant_label(variant) if many else ""
        if len(sets) > 1:  # generalisation: the item sets side by side
            side = tv.pivot_table(index="layers", columns="item_set", values="mean_slope", sort=False)[sets]
            anti = tv.pivot_table(index="layers", columns="item_set", values="anti_steerable", sort=False)[sets]
            both = pd.concat({"mean slope": side.map(lambda v: f"{v:.3g}"), "anti-steerable": anti.map("{:.0%}".format)},
                             axis=1)  # fmt: skip
            both.columns = [f"{a}: {b}" for a, b in both.columns]
            lines += [f"### {vname + ': ' if vname else ''}item sets side by side", "", markdown_frame(both), ""]
            facets.append(Facet(f"{vname + ' · ' if vname else ''}item sets side by side", both))
        for item_set, ts in tv.groupby("item_set", sort=False):
            label = " · ".join(x for x in (vname, item_set) if x)
            best = most_steerable(ts)
            tag = slug(f"{label}")
            images = [out / f"steerability_{tag}.png"]
            plot_layers(ts, images[0], f"steerability per layer: {label}")
            chosen = best if best is not None else ts.sort_values("mean_slope").iloc[-1]
            key = dict(zip(SETTING, [*variant, chosen.layers, item_set], strict=True))
            mine = items[(items[list(key)] == pd.Series(key)).all(axis=1)]
            images.append(out / f"items_{tag}.png")
            plot_items(mine, images[1], f"items at {layers_words(chosen.layers)}: {label}")
            lines += [f"### {label}", "", markdown_frame(display(ts)), "", recommendation(best, item_set), ""]
            lines.append(" ".join(f"![{p.stem}]({p.name})" for p in images))
            lines.append("")
            facets.append(Facet(f"{label} — {recommendation(best, item_set).replace('**', '')}", display(ts), images))
    return lines, Section("steerability", NOTE, facets)
