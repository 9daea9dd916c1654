"""The sweep's vector step: each (concept, method) vector set computed once per run folder or
loaded from the config's file, and where it is kept."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from steersweep.runs.folder import RunFolder
from steersweep.runs.grid import all_layers, as_list, concepts
from steersweep.vectors.directions import compute_methods, mean_activation
from steersweep.vectors.vectorset import VectorSet, load, save

log = logging.getLogger(__name__)


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
    from steersweep.hooks.layers import get_layers

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
