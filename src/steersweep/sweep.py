"""The sweep: expand the grid into cells, skip finished ones, take this worker's share, run.

A cell is (layer, alpha, prompt, sample) for the configured concept. Its id hashes exactly those,
so any worker, any retry, any batch composition names the same cell the same way: resume is a
set difference, and the merge keeps one row per id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import generation as G
from . import metrics as M
from .hooks import hook_name
from .results import ResultsError, RunFolder, git_commit, host_info, package_versions
from .validate import ConfigError, validate_inputs, validate_model, validate_static
from .vectors import VectorSet, compute_caa, load, mean_activation, save

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Cell:
    cell_id: str
    layer: int
    alpha: float
    prompt_id: str
    prompt: str
    sample: int
    seed: int


def cell_key(concept: str, layer: int, alpha: float, prompt_id: str, sample: int) -> str:
    return hashlib.sha1(f"{concept}|{layer}|{alpha!r}|{prompt_id}|{sample}".encode()).hexdigest()[:16]


def expand(cfg: DictConfig, prompts: list[dict]) -> list[Cell]:
    """layers x alphas x prompts x samples, in a fixed order."""
    cells = []
    for layer in cfg.steering.layers:
        for alpha in cfg.steering.alphas:
            for p in prompts:
                for s in range(cfg.steering.samples):
                    cid = cell_key(cfg.vectors.concept, int(layer), float(alpha), p["id"], s)
                    seed = (cfg.generation.seed * 1_000_003 + int(cid, 16)) % 2**31
                    cells.append(Cell(cid, int(layer), float(alpha), p["id"], p["prompt"], s, seed))
    return cells


def shard_of(cfg: DictConfig) -> tuple[int, int]:
    """This worker's (index, count): config, else the Slurm array task, else (0, 1).

    Bad Slurm array variables are refused here, where they are read, so no worker silently takes
    the wrong cells.
    """
    if cfg.shard_count is not None:
        return int(cfg.shard_index or 0), int(cfg.shard_count)
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if not count:
        return 0, 1
    raw = {k: os.environ.get(k) for k in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN")}
    try:
        n, i, first = int(count), int(raw["SLURM_ARRAY_TASK_ID"] or ""), int(raw["SLURM_ARRAY_TASK_MIN"] or 0)
    except ValueError:
        shown = " ".join(f"{k}={v}" for k, v in raw.items() if v is not None)
        raise ConfigError(
            f"Slurm array environment is not integers ({shown}): unset it or set shard_index and shard_count"
        ) from None
    if not (n >= 1 and 0 <= i - first < n):
        raise ConfigError(
            f"Slurm array task {i} (min {first}) is not in a contiguous array of {n} tasks: "
            f"submit --array=0-{max(n, 1) - 1}, or set shard_index and shard_count"
        )
    return i - first, n


def run_folder(cfg: DictConfig) -> RunFolder:
    if cfg.run_dir:
        return RunFolder(Path(cfg.run_dir).expanduser())
    name = cfg.run_name or f"{cfg.model.name}-{cfg.vectors.concept}"
    root = Path(cfg.results_root)
    if not root.is_absolute():
        root = PROJECT_ROOT / root
    return RunFolder(root / name)


# Config keys that define what a row means; a run folder refuses rows made under other values.
IDENTITY_KEYS = ("model", "vectors", "generation", "steering.positions", "prompts", "eval")


def identity(cfg: DictConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    out = {}
    for key in IDENTITY_KEYS:
        node = c
        for part in key.split("."):
            node = node[part]
        out[key] = node
    for k in ("batch_size", "max_batch_size"):  # batching never changes a row
        out["generation"].pop(k, None)
    out["vectors"].pop("batch_size", None)
    return out


def check_resume(folder: RunFolder, cfg: DictConfig) -> None:
    """A run folder may be resumed or extended only with the same row-defining config."""
    old = folder.read_manifest()
    if old is None:
        return
    new = identity(cfg)
    diff = [
        k
        for k in new
        if json.dumps(old.get("identity", {}).get(k), sort_keys=True) != json.dumps(new[k], sort_keys=True)
    ]
    if diff:
        raise ConfigError(
            f"run folder {folder.path} holds rows made with a different {', '.join(diff)}: "
            "set run_dir (or run_name) to a new folder, or restore the old settings"
        )


def get_vectors(cfg: DictConfig, model, tokenizer, inputs: dict, folder: RunFolder) -> VectorSet:
    """Load vectors (file, or the ones this run already computed) or compute and save them."""
    layers = list(cfg.steering.layers)
    saved = folder.path / "vectors.safetensors"
    if cfg.vectors.source == "file":
        vs = inputs["vectors"]
    elif saved.is_file() and set(layers) <= set(load(saved).vectors):
        vs = load(saved, cfg.vectors.concept)  # resume: reuse exactly the vectors the rows were made with
    else:
        t0 = time.perf_counter()
        vs = compute_caa(
            model, tokenizer, inputs["pairs"], layers, cfg.vectors.concept, cfg.vectors.position,
            cfg.vectors.batch_size, cfg.vectors.chat_template, cfg.model.layers_path, cfg.model.name,
        )  # fmt: skip
        log.info(
            "computed %d vectors from %d pairs in %.1f s", len(layers), len(inputs["pairs"]), time.perf_counter() - t0
        )
        if cfg.vectors.save:
            save(vs, saved)
    if cfg.vectors.normalize:
        vs = vs.normalized()
    missing = [layer for layer in layers if layer not in vs.resid_norms]
    if missing:  # loaded vectors without norms: measure the residual stream on the prompts
        texts = [p["prompt"] for p in inputs["prompts"]]
        _, norms = mean_activation(model, tokenizer, texts, missing, -1, 16, cfg.model.layers_path)
        vs.resid_norms.update(norms)
    return vs


def manifest(cfg: DictConfig, vs: VectorSet | None, load_info: dict | None, shard: tuple[int, int]) -> dict:
    return {
        "identity": identity(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git_commit(PROJECT_ROOT),
        "packages": package_versions(),
        "host": host_info(),
        "shard": list(shard),
        "load": load_info,
        "vectors": {
            str(layer): {
                "vector_id": vs.vector_id(layer), "sha256": vs.sha256(layer), "norm": vs.norm(layer),
                "resid_norm": vs.resid_norms.get(layer), "meta": vs.meta,
            }
            for layer in cfg.steering.layers
        } if vs else None,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip


def prepare(cfg: DictConfig) -> dict:
    """Everything that can fail before a weight is read: validation, inputs, folder, resume set."""
    validate_static(cfg)
    shard = shard_of(cfg)
    hf = validate_model(cfg)
    inputs = validate_inputs(cfg, hf)
    folder = run_folder(cfg)
    check_resume(folder, cfg)
    try:
        folder.create()
    except ResultsError as e:
        raise ConfigError(str(e)) from None
    cells = expand(cfg, inputs["prompts"])
    done = folder.done_cells()
    todo = [c for c in cells if c.cell_id not in done][shard[0] :: shard[1]]
    return {"hf": hf, "inputs": inputs, "folder": folder, "cells": cells, "todo": todo, "shard": shard, "done": done}


def run_sweep(cfg: DictConfig, model=None, tokenizer=None, load_info: dict | None = None) -> dict:
    """Run (or resume) the sweep; returns a summary with the merged table's path.

    Args:
        model, tokenizer: an already loaded model (tests, data parallel); loaded here otherwise.
    """
    from .distributed import Dist

    dist = Dist.from_cfg(cfg)
    st = None
    if dist.is_main:
        try:
            st = prepare(cfg)
        except Exception as e:  # the other ranks must learn of it, not wait in the broadcast forever
            st = {"error": e}
    st = dist.broadcast(st)
    if "error" in st:
        raise st["error"]
    folder: RunFolder = st["folder"]
    todo: list[Cell] = st["todo"][dist.rank :: dist.world]
    log.info(
        "%d cells in the grid, %d already done, %d for this worker (shard %d/%d, rank %d/%d)",
        len(st["cells"]), len(st["done"]), len(todo), st["shard"][0], st["shard"][1], dist.rank, dist.world,
    )  # fmt: skip
    if not st["todo"]:
        log.info("nothing to do: every cell of this shard is already in %s", folder.parts)
        return finish(cfg, folder, st, written=0)
    if model is None:
        from .loading import load_model

        model, tokenizer, load_info = load_model(cfg.model, cfg.memory, gpu=dist.local_gpu)
    tokenizer.padding_side = "left"
    vs = get_vectors(cfg, model, tokenizer, st["inputs"], folder)
    if dist.is_main and (folder.read_manifest() is None or st["shard"][0] == 0):
        folder.write_manifest(manifest(cfg, vs, load_info, st["shard"]))
    written = generate_cells(cfg, model, tokenizer, vs, st["inputs"], todo, folder, dist)
    return finish(cfg, folder, st, written, dist)


def generate_cells(
    cfg, model, tokenizer, vs: VectorSet, inputs: dict, todo: list[Cell], folder: RunFolder, dist
) -> int:
    """Generate and score `todo` in batches, writing one part file per finished batch."""
    from tqdm.auto import tqdm

    gen = cfg.generation
    pad = tokenizer.pad_token_id
    prompt_ids = dict(
        zip(
            [p["id"] for p in inputs["prompts"]],
            G.encode_prompts(tokenizer, [p["prompt"] for p in inputs["prompts"]], gen),
            strict=True,
        )
    )
    ctx = getattr(model.config, "max_position_embeddings", None)
    too_long = [pid for pid, ids in prompt_ids.items() if ctx and len(ids) + gen.max_new_tokens > ctx]
    if too_long:
        raise ConfigError(
            f"prompt(s) {too_long[:3]} plus max_new_tokens={gen.max_new_tokens} exceed the model's context of "
            f"{ctx} tokens: shorten them or lower generation.max_new_tokens"
        )
    todo = sorted(todo, key=lambda c: (len(prompt_ids[c.prompt_id]), c.layer, c.alpha))  # less padding
    longest = max((len(prompt_ids[c.prompt_id]) for c in todo), default=1) + gen.max_new_tokens
    batch = G.auto_batch_size(model, longest, gen)
    log.info("generating %d rows, %d per batch", len(todo), batch)
    names = list(cfg.eval.metrics)
    patterns = dict(cfg.eval.regex)
    lists = inputs.get("word_lists", {})
    # behavior_prob is per (layer, alpha): scored lazily, batch by batch, and seeded from rows already
    # written, so a job killed early and restarted never redoes (or waits on) the whole table.
    behavior = folder.behavior_done() if "behavior_prob" in names else None
    judge = None
    if cfg.eval.judge is not None:
        from .judge import Judge

        judge = Judge(cfg.eval.judge)
    worker = f"s{shard_tag(cfg)}" + (f"r{dist.rank}" if dist.world > 1 else "")
    # per-layer constants of every row (hashing a vector per row would be wasted work)
    vec_ids = {layer: vs.vector_id(layer) for layer in vs.vectors}
    norms = {layer: vs.norm(layer) for layer in vs.vectors}
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not cfg.progress or not dist.is_main)
    written = 0

    def run_batch(chunk: list[Cell]):
        steering = [(c.layer, c.alpha, vs.vectors[c.layer]) for c in chunk]
        return G.generate_rows(
            model, tokenizer, [prompt_ids[c.prompt_id] for c in chunk], steering, gen,
            [c.seed for c in chunk] if gen.do_sample else None, cfg.steering.positions, cfg.model.layers_path,
        )  # fmt: skip

    def on_done(chunk: list[Cell], outs: list[G.Completion], seconds: float):
        nonlocal written
        ppl = (
            M.perplexities(model, [prompt_ids[c.prompt_id] for c in chunk], [o.token_ids for o in outs], pad,
                           layers_path=cfg.model.layers_path)
            if "perplexity" in names else [None] * len(chunk)
        )  # fmt: skip
        if behavior is not None:
            new = sorted({(c.layer, c.alpha) for c in chunk} - set(behavior))
            if new:
                behavior.update(behavior_table(cfg, model, tokenizer, vs, inputs, new))
        judged = judge.score([c.prompt for c in chunk], [o.text for o in outs]) if judge else [None] * len(chunk)
        rows = []
        for c, o, p, j in zip(chunk, outs, ppl, judged, strict=True):
            norm = norms[c.layer]
            resid = vs.resid_norms.get(c.layer)
            row = {
                "run_id": folder.path.name, "cell_id": c.cell_id, "model": cfg.model.name, "layer": c.layer,
                "hook_name": hook_name(c.layer), "alpha": c.alpha,
                "alpha_rel": c.alpha * norm / resid if resid else None,
                "vector_id": vec_ids[c.layer], "vector_norm": norm, "prompt_id": c.prompt_id,
                "prompt": c.prompt, "sample": c.sample, "seed": c.seed, "completion": o.text,
                "n_new_tokens": o.n_new_tokens, "stop_reason": o.stop_reason,
                "seconds": seconds / len(chunk), "worker": worker,
            }  # fmt: skip
            row.update(M.text_metrics(o.text, o.token_ids, names, lists, patterns))
            if p is not None:
                row["perplexity"] = p
            if j is not None:
                row["judge_score"] = j
            if behavior is not None:
                row["behavior_prob"], row["behavior_prob_sem"] = behavior[(c.layer, c.alpha)]
            rows.append(row)
        if dist.world > 1:
            gathered = dist.gather(rows)
            if dist.is_main and gathered:
                folder.write_part(gathered, worker="dp")
                written += len(gathered)
        else:
            folder.write_part(rows, worker)
            written += len(rows)
        bar.update(len(chunk) * dist.world)

    n_batches = None
    if dist.world > 1:  # every rank must join the same number of gathers
        n_batches = dist.max_int((len(todo) + batch - 1) // batch)
        batch = max(1, -(-len(todo) // n_batches)) if todo else batch
    finished = 0

    def counted(chunk, outs, seconds):
        nonlocal finished
        finished += 1
        on_done(chunk, outs, seconds)

    G.generate_with_backoff(run_batch, todo, batch, counted, cfg.memory.batch_timeout_s)
    for _ in range((n_batches or 0) - finished):  # a rank with fewer cells still joins each gather
        on_done([], [], 0.0)
    bar.close()
    return written


def shard_tag(cfg) -> str:
    i, n = shard_of(cfg)
    return f"{i}of{n}"


def behavior_table(cfg, model, tokenizer, vs: VectorSet, inputs: dict, settings: list[tuple[int, float]]) -> dict:
    """behavior_prob (mean, sem) per (layer, alpha), scored once per setting with per-row steering."""
    t0 = time.perf_counter()
    chat = G.use_chat_template(tokenizer, cfg.generation.chat_template)
    enc = M.encode_behavior_items(tokenizer, inputs["behavior_items"], cfg.eval.behavior_format, chat)
    rows = [(layer, alpha, vs.vectors[layer]) for layer, alpha in settings]
    res = M.behavior_probs(model, enc, rows, tokenizer.pad_token_id, 32, cfg.model.layers_path)
    log.info("behavior_prob for %d settings x %d items in %.1f s", len(settings), len(enc), time.perf_counter() - t0)
    return dict(zip(settings, res, strict=True))


def finish(cfg: DictConfig, folder: RunFolder, st: dict, written: int, dist=None) -> dict:
    """Merge (when every cell of the grid is present) and report; print where the table is."""
    if dist is not None and not dist.is_main:
        return {"written": written}
    done = folder.done_cells()
    all_ids = {c.cell_id for c in st["cells"]}
    complete = all_ids <= done
    summary = {"written": written, "run_dir": str(folder.path), "cells": len(all_ids), "present": len(all_ids & done)}
    if complete:
        df, path = folder.merge(csv=cfg.report.csv)
        summary["table"] = str(path)
        summary["rows"] = len(df)
        if cfg.report.enabled:
            from .report import write_report

            summary["report"] = str(write_report(folder.path, cfg.report))
        print(f"wrote {written} new rows; {len(df)} rows in {path}")
    else:
        print(
            f"wrote {written} new rows into {folder.parts}; {summary['present']}/{len(all_ids)} cells present "
            "(merge when every shard has finished: task=merge run_dir=...)"
        )
    return summary


def compute_vectors_only(cfg: DictConfig) -> dict:
    """task=vectors: compute and save the vectors, no generation."""
    st = prepare(cfg)
    from .loading import load_model

    model, tokenizer, _ = load_model(cfg.model, cfg.memory)
    tokenizer.padding_side = "left"
    vs = get_vectors(cfg, model, tokenizer, st["inputs"], st["folder"])
    path = st["folder"].path / "vectors.safetensors"
    if not path.is_file():
        save(vs, path)
    for layer in cfg.steering.layers:
        print(f"layer {layer}: |v| = {vs.norm(layer):.3f}  mean |h| = {vs.resid_norms.get(layer, float('nan')):.3f}")
    print(f"vectors saved to {path}")
    return {"vectors": str(path)}
