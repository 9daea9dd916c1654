"""The conductor of one job: prepare -> load -> vectors -> generate -> score -> write -> merge.

Every worker (a shard of a Slurm array, a data-parallel rank, a rerun) runs this same flow over
the plan claimed in the run folder (see runs/grid.py and runs/planfile.py): it takes its own planned batches, skips the
finished ones, writes one part file per batch, and whichever worker finds every cell present
merges the table and writes the report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from omegaconf import DictConfig

from steersweep.core.errors import ConfigError, PlanError, ResultsError
from steersweep.core.progress import Progress
from steersweep.generation import decode as G
from steersweep.inputs.encoding import encode_prompts, over_context
from steersweep.model import memory as M
from steersweep.pipeline.finish import finish, manifest
from steersweep.pipeline.validate import validate_inputs, validate_model, validate_static
from steersweep.pipeline.vectorstage import get_vectors
from steersweep.runs.folder import RunFolder
from steersweep.runs.grid import Batch, Cell, Grid, deal, expand
from steersweep.runs.grid import todo as plan_todo
from steersweep.runs.identity import folder_for, identity, identity_hash
from steersweep.runs.launch import shard_of, worker_name
from steersweep.runs.planfile import RunPlan, claim_plan
from steersweep.scoring.scorer import Scorer, ScoreSettings, steering_of
from steersweep.vectors.vectorset import VectorSet, save

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What rank 0 learns before any weight is read, broadcast to every rank."""

    hf: object
    grid: Grid
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
    grid = Grid.of(cfg)
    inputs = validate_inputs(cfg, hf)
    ident = identity(cfg)
    h = identity_hash(ident)
    folder = RunFolder(folder_for(cfg, h))
    try:
        folder.create()
        cells = expand(grid, inputs["prompts"], h, hf.num_hidden_layers)
        plan = claim_plan(grid, folder.path, cells, ident, h)
    except (ResultsError, PlanError) as e:
        raise ConfigError(str(e)) from None
    return Prepared(hf, grid, inputs, folder, plan, shard, folder.done_cells())


def run_sweep(cfg: DictConfig, model=None, tokenizer=None, load_info: dict | None = None) -> dict:
    """Run (or resume) this worker's share of the plan; returns a summary with the table's path.

    Args:
        model, tokenizer: an already loaded model (tests, notebooks); loaded here otherwise.
    """
    from steersweep.runs.distributed import Dist

    dist = Dist.of(bool(cfg.data_parallel))
    st: Prepared = dist.call_on_main(lambda: prepare(cfg))
    folder, plan = st.folder, st.plan
    worker = worker_name(st.shard, dist.rank, dist.world)
    log.info("grid: %s", st.grid.origin)
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
                from steersweep.model.loading import load_model

                model, tokenizer, load_info = load_model(cfg.model, cfg.memory, gpu=dist.local_gpu)
            tokenizer.padding_side = "left"
            vsets = get_vectors(st.grid, cfg.vectors, cfg.model, model, tokenizer, st.inputs, folder)
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
    prompt_ids = dict(zip([p["id"] for p in inputs["prompts"]], encode_prompts(tokenizer, texts, gen), strict=True))
    too_long, ctx = over_context(model, prompt_ids, gen.max_new_tokens)
    if too_long:
        raise ConfigError(
            f"prompt(s) {too_long[:3]} plus max_new_tokens={gen.max_new_tokens} exceed the model's context of "
            f"{ctx} tokens: shorten them or lower generation.max_new_tokens"
        )
    longest = max(len(prompt_ids[c.prompt_id]) for b in batches for c in b.cells) + gen.max_new_tokens
    chunk = M.rows_that_fit(model, longest, gen.max_batch_size, layers_path=cfg.model.layers_path)
    log.info("generating %d batches; up to %d rows per generate call", len(batches), chunk)
    settings = ScoreSettings(
        cfg.model.name, cfg.model.layers_path, cfg.steering.positions, cfg.generation.chat_template,
        tuple(cfg.eval.metrics), dict(cfg.eval.regex), bool(cfg.eval.behavior_length_normalize), cfg.eval.judge,
    )  # fmt: skip
    scorer = Scorer(settings, model, tokenizer, vsets, inputs, prompt_ids, folder)
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


def compute_vectors_only(cfg: DictConfig) -> dict:
    """task=vectors: compute and save the vectors, no generation."""
    st = prepare(cfg)
    from steersweep.model.loading import load_model

    model, tokenizer, _ = load_model(cfg.model, cfg.memory)
    tokenizer.padding_side = "left"
    vsets = get_vectors(st.grid, cfg.vectors, cfg.model, model, tokenizer, st.inputs, st.folder)
    keys, said = list(vsets), []
    for key, vs in vsets.items():
        path = st.folder.vectors_path(keys, key)
        if not path.is_file():
            save(vs, path)
        for layer in sorted(vs.vectors):
            said.append(f"{'/'.join(key) + ' ' if len(keys) > 1 else ''}layer {layer}: |v| = {vs.norm(layer):.3f}  "
                        f"mean |h| = {vs.resid_norms.get(layer, float('nan')):.3f}")  # fmt: skip
        said.append(f"vectors saved to {path}")
    return {"vectors": str(st.folder.vectors_path(keys, keys[0])), "said": said}
