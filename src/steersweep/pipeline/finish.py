"""A run's ending: the manifest (provenance), merging the workers' tables, the last summary lines,
and `task=status`."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from steersweep.core.errors import ConfigError
from steersweep.core.paths import source_checkout
from steersweep.model.dtypes import dtype_decision
from steersweep.runs.folder import RunFolder
from steersweep.runs.grid import as_list, batch_cells
from steersweep.runs.launch import cli_command, finish_command, run_dir_arg
from steersweep.runs.planfile import RunPlan, read_plan_doc
from steersweep.runs.provenance import git_commit, host_info, package_versions
from steersweep.vectors.vectorset import VectorSet


def manifest(
    cfg: DictConfig, plan: RunPlan, vsets: dict[tuple[str, str], VectorSet] | None, load_info: dict | None, shard
) -> dict:
    """The run's provenance. `vectors`: per layer, the vector's id, hash and norms; with several
    concepts or methods, one such table per "<concept>/<method>" (`vectors_by_set`), the first's also
    under `vectors`."""

    steered = sorted({layer for c in plan.cells for layer in c.steered_layers})

    def table(vs: VectorSet) -> dict:
        return {
            str(layer): {
                "vector_id": vs.vector_id(layer), "sha256": vs.sha256(layer), "norm": vs.norm(layer),
                "resid_norm": vs.resid_norms.get(layer), "meta": vs.meta,
            }
            for layer in steered
        }  # fmt: skip

    tables = {f"{c}/{m}": table(vs) for (c, m), vs in (vsets or {}).items()}
    return {
        "identity": plan.identity,
        "identity_hash": plan.identity_hash,
        "plan": {"cells": len(plan.cells), "batches": len(plan.batches), "batch_size": plan.batch_size},
        "config": OmegaConf.to_container(cfg, resolve=True),
        # the source checkout's commit; an installed wheel has none: packages["steersweep"] says what ran
        "git_commit": git_commit(checkout) if (checkout := source_checkout()) else None,
        "packages": package_versions(),
        "host": host_info(),
        "shard": list(shard),
        "dtype": dtype_decision(cfg.model.dtype),
        "load": load_info,
        "vectors": next(iter(tables.values())) if tables else None,
        "vectors_by_set": tables if len(tables) > 1 else None,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------
# Merge and status


def finish(cfg: DictConfig, folder: RunFolder, plan: RunPlan, written: int) -> dict:
    """Merge and report when every cell of the plan is present; else say what is missing. The
    summary's "said" holds the lines the CLI prints."""
    done = folder.done_cells()
    all_ids = {c.cell_id for c in plan.cells}
    present = len(all_ids & done)
    summary = {"written": written, "run_dir": str(folder.path), "cells": len(all_ids), "present": present}
    if present < len(all_ids):
        summary["said"] = [
            f"wrote {written} new rows into {folder.parts}; {present}/{len(all_ids)} cells present "
            f"(the other shards' batches; the last worker to finish merges).",
            f"  see: {cli_command()} task=status {run_dir_arg(folder.path)}",
        ]
        return summary
    df, path = folder.merge(csv=cfg.report.csv, keep=all_ids)
    summary.update(table=str(path), rows=len(df))
    if cfg.report.enabled:
        from steersweep.reporting.write import write_report

        summary["report"] = str(write_report(folder.path, cfg.report))
    summary["said"] = end_summary(df, path, written, cfg, summary.get("report")).splitlines()
    return summary


def end_summary(df, path, written: int, cfg: DictConfig, report: str | None) -> str:
    """The run's last words on the console: rows, the best (layer, alpha), where to look."""
    from steersweep.reporting.best import best_cell, describe_cell
    from steersweep.reporting.tables import variants

    lines = [f"done: {len(df)} rows in {path} ({written} written by this job)"]
    best, rule = best_cell(df, cfg.report)
    obj = cfg.report.objective
    if best is not None:
        cell = describe_cell(best, show_variant=len(variants(df)) > 1)
        lines.append(f"  best by {obj}: {cell} (mean {obj} {best['objective']:.3g}; {rule})")
    else:
        lines.append(f"  best by {obj}: none ({rule})")
    steer = folder_steerability(Path(path).parent, cfg)
    if steer:
        lines.append(f"  {steer}")
    if report:
        from steersweep.reporting.write import PAGE

        html = Path(report).with_name(PAGE)
        lines.append(f"  report: {html if html.is_file() else report}")
    return "\n".join(lines)


def folder_steerability(run_dir: Path, cfg: DictConfig) -> str:
    """The most steerable layer set on the run's main behaviour items, in words ("" without a table)."""
    import pandas as pd

    from steersweep.inputs.datasets import set_name
    from steersweep.reporting.steerability import recommendation
    from steersweep.scoring.reliability import most_steerable

    path = RunFolder(run_dir).steerability_path
    if not path.is_file():
        return ""
    table = pd.read_parquet(path)
    item_set = set_name(as_list(cfg.eval.behavior_dataset)[0])
    main = table[table.item_set == item_set]
    best = most_steerable(main) if len(main[["concept", "method", "mode"]].drop_duplicates()) == 1 else None
    return "" if best is None else recommendation(best, item_set).replace("**", "")  # the report's sentence


def status(folder: RunFolder) -> dict:
    """Cells done per shard, cells missing, and the command that finishes them (`task=status`); "said"
    holds the lines the CLI prints."""
    doc = read_plan_doc(folder.path)
    if doc is None:
        raise ConfigError(f"{folder.path} holds no plan.json: not a run folder (check run_dir)")
    order = [row[0] for row in doc["cells"]]
    coords = {row[0]: row[1:] for row in doc["cells"]}
    size = int(doc["batch_size"])
    batches = batch_cells(doc)
    frames, _ = folder.read_parts(columns=["cell_id", "worker"])
    done: set[str] = set()
    counts: set[int] = set()
    for f in frames:
        done |= set(f["cell_id"])
        for w in set(f["worker"]):
            if w and w.startswith("s") and "of" in w:
                counts.add(int(w[1:].split("of")[1].split("r")[0]))
    missing = [i for i, b in enumerate(batches) if not set(b) <= done]
    n_missing = sum(1 for i in order if i not in done)
    said = [f"run folder {folder.path} (identity {doc['identity_hash']})"]
    said.append(f"plan: {len(order)} cells in {len(batches)} batches of {size}")
    said.append(
        f"cells present: {len(order) - n_missing}/{len(order)}; batches complete: {len(batches) - len(missing)}/{len(batches)}"
    )
    shards = {}
    for n in sorted(counts - {1}) or [1]:
        for i in range(n):
            mine = [b for k, b in enumerate(batches) if k % n == i]
            cells = [c for b in mine for c in b]
            got = sum(c in done for c in cells)
            shards[f"{i}of{n}"] = (got, len(cells))
            said.append(
                f"  shard {i} of {n}: {got}/{len(cells)} cells, {sum(set(b) <= done for b in mine)}/{len(mine)} batches"
            )
    if n_missing:
        lost = [coords[c] for b in missing for c in batches[b] if c not in done]
        layers = sorted({str(x[4]) if len(x) > 4 else str(x[0]) for x in lost}, key=lambda v: (len(v), v))
        alphas = sorted({float(x[1]) for x in lost})
        prompts = sorted({str(x[2]) for x in lost})
        said.append(
            f"missing: {n_missing} cells in batches {', '.join(f'b{i:05d}' for i in missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
            + f" (layers {layers}, alphas {alphas}, {len(prompts)} prompts)"
        )
        said.append(f"finish with: {finish_command(list(doc.get('command') or []), folder.path)}")
    else:
        said.append(
            "complete: every cell is present" + ("" if folder.results_path.is_file() else "; merge with task=merge")
        )
    return {
        "cells": len(order), "present": len(order) - n_missing, "missing_batches": missing, "shards": shards,
        "said": said,
    }  # fmt: skip
