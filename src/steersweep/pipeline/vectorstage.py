"""The sweep's vector step: each (concept, method) vector set computed once per run folder or
loaded from the config's file, and where it is kept."""

from __future__ import annotations

import logging
import time

from steersweep.core.config import ModelConfig, VectorsConfig
from steersweep.hooks.layers import get_layers
from steersweep.runs.folder import RunFolder
from steersweep.runs.grid import Grid
from steersweep.vectors.directions import compute_methods, mean_activation
from steersweep.vectors.vectorset import VectorSet, load, save

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------


def get_vectors(
    grid: Grid, vec: VectorsConfig, model_cfg: ModelConfig, model, tokenizer, inputs: dict, folder: RunFolder
) -> dict[tuple[str, str], VectorSet]:
    """{(concept, method): VectorSet}: loaded (files, or the ones this run already computed) or the
    missing ones computed, every method of a concept in one pass over its pairs, and saved.

    Args:
        grid: the sweep's axes (which concepts, methods and layers need vectors).
        vec, model_cfg: the `vectors` and `model` config groups (how to compute them, which model).
    """
    layers = grid.all_layers(len(get_layers(model, model_cfg.layers_path)))
    keys = grid.vector_keys()
    sets: dict[tuple[str, str], VectorSet] = {}
    if vec.source == "file":
        sets = {key: inputs["vectors"][key[0]] for key in keys}  # one method per file (validated)
    else:
        for key in keys:
            saved = folder.vectors_path(keys, key)
            if saved.is_file() and set(layers) <= set(load(saved).vectors):
                sets[key] = load(saved, key[0])  # resume: exactly the vectors the rows were made with
        for concept in grid.concept_names:
            todo = [m for c, m in keys if c == concept and (c, m) not in sets]
            if not todo:
                continue
            pairs = inputs["pairs"][concept]
            t0 = time.perf_counter()
            made = compute_methods(
                model, tokenizer, pairs, layers, concept, todo, vec.position, vec.batch_size, vec.chat_template,
                model_cfg.layers_path, model_cfg.name, vec.read_at, vec.logistic_c,
            )  # fmt: skip
            log.info(
                "computed %d %s vectors (%s) from %d pairs in %.1f s",
                len(layers) * len(todo), concept, ", ".join(todo), len(pairs), time.perf_counter() - t0,
            )  # fmt: skip
            for m, vs in made.items():
                sets[(concept, m)] = vs
                if vec.save:
                    save(vs, folder.vectors_path(keys, (concept, m)))
    for key, vs in sets.items():
        if vec.normalize:
            vs = sets[key] = vs.normalized()
        missing = [layer for layer in layers if layer not in vs.resid_norms]
        if missing:  # loaded vectors without norms: measure the residual stream on the prompts
            texts = [p["prompt"] for p in inputs["prompts"]]
            _, norms = mean_activation(model, tokenizer, texts, missing, -1, 16, model_cfg.layers_path)
            vs.resid_norms.update(norms)
    return {key: sets[key] for key in keys}
