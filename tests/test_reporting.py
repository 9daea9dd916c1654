"""The report's tables over layer sets and steering variants (concept, method, mode), on synthetic tables.

Every expected value is computed here with plain pandas, independently of steersweep.reporting.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.tables import ALPHAS, LAYER_SETS, METHODS, MODES, VARIANT, variant_table

from steersweep.core.config import ReportConfig
from steersweep.reporting.best import best_cell, best_per_variant, first_alpha_reaching
from steersweep.reporting.tables import layer_order, pivot_text, summarize
from steersweep.reporting.write import write_report


def old_table() -> pd.DataFrame:
    """A table written before layer sets and methods: no `layers`, `method` or `mode` column."""
    df = variant_table()
    df = df[(df.method == "mean_diff") & (df["mode"] == "add") & (df.layers == "10")]
    df = pd.concat([df, df.assign(layer=14, cell_id=df.cell_id + "-14")], ignore_index=True)
    return df.drop(columns=["layers", "method", "mode"]).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------


def test_layer_labels_sort_naturally():
    labels = ["18", "10+14", "all", "6", "10", "10+12+14", "14", "6+30"]
    assert layer_order(labels) == ["6", "6+30", "10", "10+14", "10+12+14", "14", "18", "all"]
    df = variant_table()
    df = df[(df.method == "mean_diff") & (df["mode"] == "add")]
    extra = [df.assign(layers=lab, layer=int(lab.split("+")[0]) if lab != "all" else 0) for lab in ("6", "all", "14")]
    s = summarize(pd.concat([df, *extra], ignore_index=True), "perplexity")
    assert list(dict.fromkeys(s["layers"])) == ["6", "10", "10+14", "14", "all"]
    p = pivot_text(s)
    assert p.index.names == ["model", "layers"]
    assert [ix[1] for ix in p.index] == ["6", "10", "10+14", "14", "all"]


def test_summarize_never_mixes_variants():
    df = variant_table()
    for metric in ("behavior_prob", "perplexity"):
        s = summarize(df, metric)
        assert len(s) == len(METHODS) * len(MODES) * len(LAYER_SETS) * len(ALPHAS)
        assert {"concept", "method", "mode", "layers", "layer", "alpha", "mean", "ci95", "n"} <= set(s.columns)
        assert (s["n"] == 3).all()
        for _, r in s.iterrows():
            rows = df[
                (df.method == r.method) & (df["mode"] == r["mode"]) & (df.layers == r.layers) & (df.alpha == r.alpha)
            ]
            assert r["mean"] == pytest.approx(rows[metric].mean())
            assert r["ci95"] == pytest.approx(1.96 * rows[metric].std() / np.sqrt(len(rows)))
            assert r.layer == 10
    # the methods really differ at a steered cell: averaging them would have shown
    s = summarize(df, "behavior_prob").set_index(["method", "mode", "layers", "alpha"])["mean"]
    assert s["mean_diff", "add", "10", 2.0] != pytest.approx(s["pca_diff", "add", "10", 2.0])


def expected_cells(df: pd.DataFrame, cfg: ReportConfig) -> pd.DataFrame:
    """Per (variant, layers, alpha): objective mean, perplexity mean, its relative rise over alpha 0
    of the same variant and layers, and whether that rise is allowed."""
    g = df.groupby(VARIANT + ["layers", "alpha"])
    cells = pd.DataFrame({"objective": g[cfg.objective].mean(), "fluency": g[cfg.fluency_metric].mean()}).reset_index()
    base = cells[cells.alpha == 0].set_index(VARIANT + ["layers"])["fluency"]
    cells["base"] = [base[tuple(r)] for r in cells[VARIANT + ["layers"]].itertuples(index=False, name=None)]
    cells["increase"] = cells["fluency"] / cells["base"] - 1
    cells["ok"] = cells["fluency"] <= cells["base"] * (1 + cfg.max_fluency_increase)
    return cells


def test_best_per_variant_matches_plain_pandas():
    df = variant_table()
    cfg = ReportConfig(max_fluency_increase=1.0)
    cells = expected_cells(df, cfg)
    got = best_per_variant(df, cfg)
    assert len(got) == len(METHODS) * len(MODES)
    assert {"concept", "method", "mode", "layers", "layer", "alpha", "objective", "fluency_increase"} <= set(got)
    constrained = 0
    for (method, mode), mine in cells.groupby(["method", "mode"]):
        ok = mine[mine.ok & (mine.alpha != 0)]
        want = ok.loc[ok.objective.idxmax()]
        row = got[(got.method == method) & (got["mode"] == mode)]
        assert len(row) == 1
        row = row.iloc[0]
        assert (row.concept, row.layers, row.alpha) == ("sentiment", want.layers, want.alpha)
        assert row.objective == pytest.approx(want.objective)
        assert row.fluency_increase == pytest.approx(want.increase)
        assert row.layer == 10
        constrained += mine[mine.alpha != 0].objective.max() > want.objective
    assert constrained >= 1  # the fluency rule decided at least one variant's best cell

    best, rule = best_cell(df, cfg)
    overall = got.loc[got.objective.idxmax()]
    assert best is not None and "perplexity at most 2.00" in rule
    for c in ("concept", "method", "mode", "layers", "layer", "alpha", "objective"):
        assert best[c] == overall[c], c
    # a fluency rule nobody meets: every variant still has its row, with nothing admissible
    none = best_per_variant(df, ReportConfig(max_fluency_increase=-0.5))
    assert len(none) == 4 and none.alpha.isna().all()
    assert best_cell(df, ReportConfig(max_fluency_increase=-0.5))[0] is None


@pytest.mark.parametrize(("threshold", "everyone"), [(0.9, False), (0.6, True)])
def test_first_alpha_reaching_matches_plain_pandas(threshold, everyone):
    df = variant_table()
    cfg = ReportConfig()
    cells = expected_cells(df, cfg)
    got = first_alpha_reaching(df, cfg, threshold=threshold)
    assert len(got) == len(METHODS) * len(MODES) * len(LAYER_SETS)
    reached = 0
    for (method, mode, layers), mine in cells.groupby(["method", "mode", "layers"]):
        row = got[(got.method == method) & (got["mode"] == mode) & (got.layers == layers)].iloc[0]
        hit = mine[(mine.alpha != 0) & (mine.objective >= threshold)]
        assert row.max_objective == pytest.approx(mine[mine.alpha != 0].objective.max())
        if hit.empty:
            assert np.isnan(row.alpha) and np.isnan(row.objective)
            continue
        reached += 1
        want = hit.loc[hit.alpha.abs().idxmin()]
        assert row.alpha == want.alpha
        assert row.objective == pytest.approx(want.objective)
        assert row.fluency_increase == pytest.approx(want.increase)
    assert (reached == len(got)) if everyone else (0 < reached < len(got))  # at 0.9 some do not get there
    assert list(got.layers[:2]) == ["10", "10+14"]


def test_old_tables_still_report(tmp_path):
    df = old_table()
    s = summarize(df, "perplexity")
    assert list(dict.fromkeys(s.layers)) == ["10", "14"] and "method" not in s
    best, _ = best_cell(df, ReportConfig())
    assert best is not None and best.layers == str(best.layer)
    assert len(best_per_variant(df, ReportConfig())) == 1

    run = tmp_path / "old"
    run.mkdir()
    df.to_parquet(run / "results.parquet", index=False)
    text = write_report(run).read_text()
    assert re.search(r"\*\*layer 1[04], alpha [0-9.]+\*\*", text), text
    assert "### " not in text and "per variant" not in text  # one variant: no facets
    assert "| model | layer | α=-1 |" in text
    assert "layers 10, 14;" in text
    table = pd.read_csv(run / "report" / "table_perplexity.csv")
    assert list(table.layers.astype(str).unique()) == ["10", "14"]
    assert (run / "report" / "heatmap_perplexity_toy.png").is_file()


def test_old_and_new_runs_compared(tmp_path):
    """An old run (no method/mode/layers) beside a new one: the variants stay apart."""
    old, new = tmp_path / "old", tmp_path / "new"
    for d, f in ((old, old_table()), (new, variant_table())):
        d.mkdir()
        f.to_parquet(d / "results.parquet", index=False)
    text = write_report([new, old]).read_text()
    assert "### sentiment · pca_diff · ablate_add" in text
    assert "### sentiment\n" not in text and "layers 10, 10+14;" in text  # the new run's own tables
    page = (new / "report" / "index.html").read_text()
    compared = page.split('<section id="compare">')[1]
    assert 'valign="top">sentiment</th>' in compared  # the old run's variant: its concept only
    assert "10+14" in compared


def test_multi_variant_report(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    variant_table().to_parquet(run / "results.parquet", index=False)
    text = write_report(run).read_text()
    assert "4 variants (concept · method · mode)" in text
    for method in METHODS:
        for mode in MODES:
            assert text.count(f"### sentiment · {method} · {mode}\n") == 2  # behavior_prob and perplexity
            assert (run / "report" / f"heatmap_perplexity_toy__sentiment_{method}_{mode}.png").is_file()
    per_variant = text.split("## Best cell per variant")[1].split("\n## ")[0]
    assert per_variant.count("| sentiment · ") == 4
    first = text.split("## First alpha reaching behavior_prob ≥ 0.9")[1].split("\n## ")[0]
    assert first.count("| sentiment · ") == 8 and "not reached" in first
    best = text.split("## Best cell\n")[1].split("\n")[0]
    assert re.search(r"\*\*sentiment · \w+ · \w+, layers? 10(\+14)?, alpha \d\*\*", best), best
    page = (run / "report" / "index.html").read_text()
    assert "id='best-per-variant'" in page and "id='first-reaching'" in page
    assert page.count("<h3 class='variant'>sentiment · pca_diff · add</h3>") == 2


def test_compared_runs_leave_the_main_runs_tables_alone(tmp_path):
    """`report.compare_runs`: the main run's summary, table_*.csv, best cell and header come from its
    own rows; the compared run (same model and variant, overlapping and extra alphas, higher
    behaviour) shows only in the page's "Runs compared" section and browser."""
    one = variant_table()
    main = one[(one.method == "mean_diff") & (one["mode"] == "add")].reset_index(drop=True)
    other = main[main.alpha.isin([0.0, 2.0])].assign(run_id="b", behavior_prob=lambda f: f.behavior_prob + 0.05)
    extra = main[main.alpha == 2.0].assign(run_id="b", alpha=8.0, behavior_prob=0.99, perplexity=10.0)
    other = pd.concat([other, extra], ignore_index=True)
    a, b = tmp_path / "A", tmp_path / "B"
    for d, f in ((a, main), (b, other)):
        d.mkdir()
        f.to_parquet(d / "results.parquet", index=False)

    text = write_report([a, b]).read_text()

    for metric in ("behavior_prob", "perplexity"):
        got = pd.read_csv(a / "report" / f"table_{metric}.csv", dtype={"layers": str})
        want = main.groupby(["layers", "alpha"])[metric].agg(["mean", "count"]).reset_index()
        both = want.merge(got, on=["layers", "alpha"], how="outer", indicator=True)
        assert (both["_merge"] == "both").all(), both[["layers", "alpha", "_merge"]]
        assert list(both["n"]) == list(both["count"])
        np.testing.assert_allclose(both["mean_y"], both["mean_x"])
    assert f"{len(main)} completions;" in text and "alphas -1, 0, 1, 2, 4;" in text
    assert "α=8" not in text
    cfg = ReportConfig()
    cells = expected_cells(main, cfg)
    ok = cells[cells.ok & (cells.alpha != 0)]
    want = ok.loc[ok.objective.idxmax()]
    assert f"**layers {want.layers}, alpha {want.alpha:g}** ({cfg.objective} = {want.objective:.3f}" in text
    page = (a / "report" / "index.html").read_text()
    summary = page.split("<section id='summary'>")[1].split("</section>")[0]
    assert f"{len(main)} completions;" in summary and "alpha 8" not in summary
    assert "Runs compared" in page and "<th>8.0</th>" in page.split('<section id="compare">')[1]


def test_task_report_prints_the_page(tmp_path, capsys):
    """`task=report` (with a run compared) says where index.html, the report's front page, is."""
    from hydra import compose, initialize_config_dir

    from steersweep.core.config import register_configs
    from steersweep.pipeline.tasks import run

    one = variant_table()
    a, b = tmp_path / "run a", tmp_path / "run b"
    for d, f in ((a, one[one.method == "mean_diff"]), (b, one[one.method == "pca_diff"])):
        d.mkdir()
        f.to_parquet(d / "results.parquet", index=False)
    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=report", f"run_dir='{a}'", f"report.compare_runs=['{b}']"])
    said = run(cfg).said
    assert said[-1] == f"report written to {a / 'report' / 'index.html'}"
    assert (a / "report" / "index.html").is_file() and (a / "report" / "summary.md").is_file()


def test_behavior_prob_interval_is_across_items(tmp_path):
    from steersweep.reporting.write import write_report
    from steersweep.runs.folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.create()
    rows = [
        {"run_id": "r", "cell_id": f"c{a}{p}", "model": "toy", "layer": 1, "alpha": a, "prompt_id": f"p{p}",
         "prompt": "x", "completion": "y", "behavior_prob": 0.5 + a / 10, "behavior_prob_sem": 0.01,
         "perplexity": 3.0 + p}
        for a in (0.0, 1.0) for p in range(2)
    ]  # fmt: skip
    folder.write_part(rows, "w")
    folder.merge()
    summary = write_report(folder.path).read_text()
    beh = summary.split("## behavior_prob")[1].split("##")[0]
    ppl = summary.split("## perplexity")[1].split("##")[0]
    assert "interval across behaviour items" in beh and "across prompts" not in beh
    assert "interval across prompts" in ppl
    page = (folder.path / "report" / "index.html").read_text()
    assert "Mean ± 95% interval across behaviour items" in page
