"""The conductor of one job: prepare -> load -> vectors -> generate -> score -> write -> merge.

Every worker (a shard of a Slurm array, a data-parallel rank, a rerun) runs this same flow over
the plan claimed in the run folder (see plan.py): it takes its own planned batches, skips the
finished ones, writes one part file per batch, and whichever worker finds every cell present
merges the table and writes the report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import generation as G
from . import memory as M
from .loading import dtype_decision
from .paths import source_checkout
from .plan import (
    Batch,
    Cell,
    PlanError,
    RunPlan,
    all_layers,
    as_list,
    batch_cells,
    claim_plan,
    cli_command,
    concepts,
    deal,
    expand,
    finish_command,
    folder_for,
    grid_origin,
    identity,
    identity_hash,
    read_plan_doc,
    run_dir_arg,
    shard_of,
    worker_name,
)
from .plan import todo as plan_todo
from .progress import Progress
from .results import ResultsError, RunFolder, git_commit, host_info, package_versions
from .scoring import Scorer, steering_of
from .validate import ConfigError, validate_inputs, validate_model, validate_static
from .vectors import VectorSet, compute_methods, load, mean_activation, save

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What rank 0 learns before any weight is read, broadcast to every rank."""

    hf: object
    inputs: dict
    folder: RunFolder
    plan: RunPlan
    shard: tuple[int, int]
    done: set[str]


def run_folder(cfg: DictConfig) -> RunFolder:
    """The folder this config's rows go to (`run_dir`, else named after the identity)."""
    return RunFolder(folder_for(cfg, identity_hash(identity(cfg))))


def prepare(cfg: DictConfig) -> Prepared:
    """Everything that can fail before a weight is read: validation, inputs, the folder's claim."""
    validate_static(cfg)
    shard = shard_of(cfg)
    hf = validate_model(cfg)
    inputs = validate_inputs(cfg, hf)
    ident = identity(cfg)
    h = identity_hash(ident)
    folder = RunFolder(folder_for(cfg, h))
    try:
        folder.create()
        cells = expand(cfg, inputs["prompts"], h, hf.num_hidden_layers)
        plan = claim_plan(cfg, folder.path, cells, ident, h)
    except (ResultsError, PlanError) as e:
        raise ConfigError(str(e)) from None
    return Prepared(hf, inputs, folder, plan, shard, folder.done_cells())


def run_sweep(cfg: DictConfig, model=None, tokenizer=None, load_info: dict | None = None) -> dict:
    """Run (or resume) this worker's share of the plan; returns a summary with the table's path.

    Args:
        model, tokenizer: an already loaded model (tests, notebooks); loaded here otherwise.
    """
    from .distributed import Dist

    dist = Dist.from_cfg(cfg)
    st: Prepared = dist.call_on_main(lambda: prepare(cfg))
    folder, plan = st.folder, st.plan
    worker = worker_name(st.shard, dist.rank, dist.world)
    log.info("grid: %s", grid_origin(cfg))
    w, n = st.shard[0] * dist.world + dist.rank, st.shard[1] * dist.world  # this worker of n
    mine, todo = deal(plan.batches, w, n), plan_todo(plan.batches, st.done, w, n)
    log.info(
        "run folder %s: %d cells in %d batches of %d, %d cells present; worker %s: %d of its %d batches to do",
        folder.path, len(plan.cells), len(plan.batches), plan.batch_size, len(st.done), worker, len(todo), len(mine),
    )  # fmt: skip
    written, error = 0, None
    if todo:
        try:
            if model is None:
                from .loading import load_model

                model, tokenizer, load_info = load_model(cfg.model, cfg.memory, gpu=dist.local_gpu)
            tokenizer.padding_side = "left"
            vsets = get_vectors(cfg, model, tokenizer, st.inputs, folder)
            if dist.is_main and (folder.read_manifest() is None or st.shard[0] == 0):
                folder.write_manifest(manifest(cfg, plan, vsets, load_info, st.shard))
            written = generate_batches(cfg, model, tokenizer, vsets, st.inputs, todo, folder, worker, dist.is_main)
        except Exception as e:
            if dist.world == 1:
                raise
            error = e  # the other ranks must hear of it at the final meeting, not hang there
    else:
        log.info("nothing to do: every batch of worker %s is already in %s", worker, folder.parts)
    dist.raise_any(error)
    return finish(cfg, folder, plan, written) if dist.is_main else {"written": written}


def generate_batches(
    cfg: DictConfig, model, tokenizer, vsets: dict[tuple[str, str], VectorSet], inputs: dict, batches: list[Batch],
    folder: RunFolder, worker: str, show_progress: bool = True,
) -> int:  # fmt: skip
    """Generate, score and write each planned batch (one part file per batch). Returns rows written.

    A planned batch runs as one `generate` call when memory allows, else in smaller chunks (from
    the memory estimate, and halved on out-of-memory); its rows are written together either way.
    """
    gen = cfg.generation
    texts = [p["prompt"] for p in inputs["prompts"]]
    prompt_ids = dict(zip([p["id"] for p in inputs["prompts"]], G.encode_prompts(tokenizer, texts, gen), strict=True))
    ctx = getattr(model.config, "max_position_embeddings", None)
    too_long = [pid for pid, ids in prompt_ids.items() if ctx and len(ids) + gen.max_new_tokens > ctx]
    if too_long:
        raise ConfigError(
            f"prompt(s) {too_long[:3]} plus max_new_tokens={gen.max_new_tokens} exceed the model's context of "
            f"{ctx} tokens: shorten them or lower generation.max_new_tokens"
        )
    longest = max(len(prompt_ids[c.prompt_id]) for b in batches for c in b.cells) + gen.max_new_tokens
    chunk = M.rows_that_fit(model, longest, gen.max_batch_size, layers_path=cfg.model.layers_path)
    log.info("generating %d batches; up to %d rows per generate call", len(batches), chunk)
    scorer = Scorer(cfg, model, tokenizer, vsets, inputs, prompt_ids, folder)
    n_rows = sum(len(b.cells) for b in batches)
    planned = scorer.planned_sequences(batches)  # scoring is part of the job's progress, not after its 100%
    progress = Progress(n_rows, gen.max_new_tokens, bool(cfg.progress and show_progress), cfg.progress_every_s,
                        sequences=sum(planned))  # fmt: skip
    scorer.on_phase, scorer.on_scored = progress.set_phase, progress.scored
    written = 0
    seen = [0]  # tokens made or released in the current batch

    attempt = [0, 0]  # tokens and budget released by the decode now running

    def on_step(tokens: int, finished: int, step: int) -> None:
        released = finished * (gen.max_new_tokens - step - 1)
        seen[0] += tokens + released
        attempt[0] += tokens
        attempt[1] += released
        progress.step(tokens, released)

    def run(cells):
        attempt[:] = [0, 0]
        try:
            return decode(cells)
        except BaseException:  # out of memory: the retry makes these tokens again, count them once
            seen[0] -= sum(attempt)
            progress.step(-attempt[0], -attempt[1])
            raise

    def decode(cells):
        steering = [steering_of(c, vsets) for c in cells]
        return G.generate_rows(
            model, tokenizer, [prompt_ids[c.prompt_id] for c in cells], steering, gen,
            [c.seed for c in cells] if gen.do_sample else None, cfg.steering.positions, cfg.model.layers_path,
            on_step=on_step, on_layer=lambda i, n: progress.detail(f"prompt pass, layer {i}/{n}"),
        )  # fmt: skip

    for k, batch in enumerate(batches, 1):
        # one decode per decode key: a prompt's alpha-0 cells (every layer, method, mode) are one baseline
        first: dict[tuple, Cell] = {}
        for c in batch.cells:
            first.setdefault(c.decode_key, c)
        decodes = list(first.values())
        outs: list[G.Completion] = []
        decode_rows: list[int] = []  # rows of the decode that made each one: the planned batch, or a cut of it

        def done(chunk, o, _s, outs=outs, decode_rows=decode_rows):
            outs.extend(o)
            decode_rows.extend([len(chunk)] * len(chunk))

        t0 = time.perf_counter()
        seen[0] = 0
        progress.set_phase(f"generating batch {k}/{len(batches)}")
        chunk = M.generate_with_backoff(run, decodes, min(chunk, len(decodes)), done, cfg.memory.batch_timeout_s)
        progress.step(0, len(batch.cells) * gen.max_new_tokens - seen[0])  # rows made once for several cells
        made = {c.decode_key: (o, n) for c, o, n in zip(decodes, outs, decode_rows, strict=True)}
        progress.set_phase(f"scoring batch {k}/{len(batches)}")
        rows = scorer.rows(batch, [made[c.decode_key][0] for c in batch.cells], time.perf_counter() - t0, worker)
        progress.scored_batch(planned[k - 1])
        for row, c in zip(rows, batch.cells, strict=True):
            row["decode_rows"] = made[c.decode_key][1]
        if any(n < len(decodes) for n in decode_rows):
            log.warning(
                "batch %s ran in cuts of %s rows instead of %d (memory): its rows record decode_rows",
                batch.batch_id, sorted(set(decode_rows), reverse=True), len(decodes),
            )  # fmt: skip
        folder.write_part(rows, worker)
        written += len(rows)
        progress.rows_written(len(rows))
    progress.close()
    return written


# ---------------------------------------------------------------------------------------------
# Vectors and provenance


def vector_path(folder: RunFolder, keys: list[tuple[str, str]], key: tuple[str, str]) -> Path:
    """Where a run keeps computed vectors, per (concept, method): `vectors.safetensors` for the first,
    `vectors-<method>.safetensors` (one concept) or `vectors-<concept>-<method>.safetensors` for the others."""
    if key == keys[0]:
        return folder.path / "vectors.safetensors"
    concept, method = key
    return folder.path / (f"vectors-{method}.safetensors" if len({c for c, _ in keys}) == 1
                          else f"vectors-{concept}-{method}.safetensors")  # fmt: skip


def vector_keys(cfg: DictConfig) -> list[tuple[str, str]]:
    """The run's (concept, method) pairs, in grid order: one VectorSet each."""
    return [(c, str(m)) for c, _ in concepts(cfg) for m in as_list(cfg.vectors.method)]


def get_vectors(cfg: DictConfig, model, tokenizer, inputs: dict, folder: RunFolder) -> dict[tuple[str, str], VectorSet]:
    """{(concept, method): VectorSet}: loaded (files, or the ones this run already computed) or the
    missing ones computed, every method of a concept in one pass over its pairs, and saved."""
    from .hooks import get_layers

    layers = all_layers(cfg, len(get_layers(model, cfg.model.layers_path)))
    keys = vector_keys(cfg)
    sets: dict[tuple[str, str], VectorSet] = {}
    if cfg.vectors.source == "file":
        sets = {key: inputs["vectors"][key[0]] for key in keys}  # one method per file (validated)
    else:
        for key in keys:
            saved = vector_path(folder, keys, key)
            if saved.is_file() and set(layers) <= set(load(saved).vectors):
                sets[key] = load(saved, key[0])  # resume: exactly the vectors the rows were made with
        for concept, _ in concepts(cfg):
            todo = [m for c, m in keys if c == concept and (c, m) not in sets]
            if not todo:
                continue
            pairs = inputs["pairs"][concept]
            t0 = time.perf_counter()
            made = compute_methods(
                model, tokenizer, pairs, layers, concept, todo, cfg.vectors.position, cfg.vectors.batch_size,
                cfg.vectors.chat_template, cfg.model.layers_path, cfg.model.name, cfg.vectors.read_at,
                cfg.vectors.logistic_c,
            )  # fmt: skip
            log.info(
                "computed %d %s vectors (%s) from %d pairs in %.1f s",
                len(layers) * len(todo), concept, ", ".join(todo), len(pairs), time.perf_counter() - t0,
            )  # fmt: skip
            for m, vs in made.items():
                sets[(concept, m)] = vs
                if cfg.vectors.save:
                    save(vs, vector_path(folder, keys, (concept, m)))
    for key, vs in sets.items():
        if cfg.vectors.normalize:
            vs = sets[key] = vs.normalized()
        missing = [layer for layer in layers if layer not in vs.resid_norms]
        if missing:  # loaded vectors without norms: measure the residual stream on the prompts
            texts = [p["prompt"] for p in inputs["prompts"]]
            _, norms = mean_activation(model, tokenizer, texts, missing, -1, 16, cfg.model.layers_path)
            vs.resid_norms.update(norms)
    return {key: sets[key] for key in keys}


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
    """Merge and report when every cell of the plan is present; else say what is missing."""
    done = folder.done_cells()
    all_ids = {c.cell_id for c in plan.cells}
    present = len(all_ids & done)
    summary = {"written": written, "run_dir": str(folder.path), "cells": len(all_ids), "present": present}
    if present < len(all_ids):
        print(
            f"wrote {written} new rows into {folder.parts}; {present}/{len(all_ids)} cells present "
            f"(the other shards' batches; the last worker to finish merges).\n"
            f"  see: {cli_command()} task=status {run_dir_arg(folder.path)}"
        )
        return summary
    df, path = folder.merge(csv=cfg.report.csv, keep=all_ids)
    summary.update(table=str(path), rows=len(df))
    if cfg.report.enabled:
        from .reporting import write_report

        summary["report"] = str(write_report(folder.path, cfg.report))
    print(end_summary(df, path, written, cfg, summary.get("report")))
    return summary


def end_summary(df, path, written: int, cfg: DictConfig, report: str | None) -> str:
    """The run's last words on the console: rows, the best (layer, alpha), where to look."""
    from .reporting import best_cell, describe_cell, variants

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
        html = Path(report).with_name("index.html")
        lines.append(f"  report: {html if html.is_file() else report}")
    return "\n".join(lines)


def folder_steerability(run_dir: Path, cfg: DictConfig) -> str:
    """The most steerable layer set on the run's main behaviour items, in words ("" without a table)."""
    import pandas as pd

    from .data import set_name
    from .reliability import most_steerable
    from .report_steerability import recommendation

    path = RunFolder(run_dir).steerability_path
    if not path.is_file():
        return ""
    table = pd.read_parquet(path)
    item_set = set_name(as_list(cfg.eval.behavior_dataset)[0])
    main = table[table.item_set == item_set]
    best = most_steerable(main) if len(main[["concept", "method", "mode"]].drop_duplicates()) == 1 else None
    return "" if best is None else recommendation(best, item_set).replace("**", "")  # the report's sentence


def status(folder: RunFolder) -> dict:
    """Cells done per shard, cells missing, and the command that finishes them (`task=status`)."""
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
    print(f"run folder {folder.path} (identity {doc['identity_hash']})")
    print(f"plan: {len(order)} cells in {len(batches)} batches of {size}")
    print(
        f"cells present: {len(order) - n_missing}/{len(order)}; batches complete: {len(batches) - len(missing)}/{len(batches)}"
    )
    shards = {}
    for n in sorted(counts - {1}) or [1]:
        for i in range(n):
            mine = [b for k, b in enumerate(batches) if k % n == i]
            cells = [c for b in mine for c in b]
            got = sum(c in done for c in cells)
            shards[f"{i}of{n}"] = (got, len(cells))
            print(
                f"  shard {i} of {n}: {got}/{len(cells)} cells, {sum(set(b) <= done for b in mine)}/{len(mine)} batches"
            )
    if n_missing:
        lost = [coords[c] for b in missing for c in batches[b] if c not in done]
        layers = sorted({str(x[4]) if len(x) > 4 else str(x[0]) for x in lost}, key=lambda v: (len(v), v))
        alphas = sorted({float(x[1]) for x in lost})
        prompts = sorted({str(x[2]) for x in lost})
        print(
            f"missing: {n_missing} cells in batches {', '.join(f'b{i:05d}' for i in missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
            + f" (layers {layers}, alphas {alphas}, {len(prompts)} prompts)"
        )
        print(f"finish with: {finish_command(list(doc.get('command') or []), folder.path)}")
    else:
        print("complete: every cell is present" + ("" if (folder.path / "results.parquet").is_file() else
                                                     "; merge with task=merge"))  # fmt: skip
    return {"cells": len(order), "present": len(order) - n_missing, "missing_batches": missing, "shards": shards}


def compute_vectors_only(cfg: DictConfig) -> dict:
    """task=vectors: compute and save the vectors, no generation."""
    st = prepare(cfg)
    from .loading import load_model

    model, tokenizer, _ = load_model(cfg.model, cfg.memory)
    tokenizer.padding_side = "left"
    vsets = get_vectors(cfg, model, tokenizer, st.inputs, st.folder)
    keys = list(vsets)
    for key, vs in vsets.items():
        path = vector_path(st.folder, keys, key)
        if not path.is_file():
            save(vs, path)
        for layer in sorted(vs.vectors):
            print(f"{'/'.join(key) + ' ' if len(keys) > 1 else ''}layer {layer}: |v| = {vs.norm(layer):.3f}  "
                  f"mean |h| = {vs.resid_norms.get(layer, float('nan')):.3f}")  # fmt: skip
        print(f"vectors saved to {path}")
    return {"vectors": str(vector_path(st.folder, keys, keys[0]))}
