"""Steering a loaded model: `compute_vectors` (CAA vectors from pairs), `steer` (steered completions
for a grid of settings, the sweep's batched generation) and `steering`, a context manager that steers
the model's own `generate` or forward with the same hook."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from steersweep.vectors.vectorset import VectorSet

    Vectors = VectorSet | Mapping[int, torch.Tensor] | torch.Tensor  # a VectorSet, {layer: direction} or one direction

# ---------------------------------------------------------------------------------------------
# Lower level: vectors, steered generation, behaviour probability on a loaded model


def _pairs(pairs: str | os.PathLike | Sequence) -> list[dict]:
    from steersweep.core.errors import VectorError
    from steersweep.inputs.datasets import load_pairs

    if isinstance(pairs, (str, os.PathLike)):
        return load_pairs(str(pairs))
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, Mapping):
            p = dict(p)
        elif isinstance(p, (tuple, list)) and len(p) == 2:
            p = {"positive": p[0], "negative": p[1]}
        else:
            raise VectorError(f"pair {i} is a {type(p).__name__}: give (positive, negative) or a dict")
        if not isinstance(p.get("positive"), str) or not isinstance(p.get("negative"), str):
            raise VectorError(f"pair {i} needs text 'positive' and 'negative' entries")
        out.append(p)
    return out


def compute_vectors(
    model: Any,
    tokenizer: Any,
    pairs: str | os.PathLike | Sequence[tuple[str, str] | Mapping[str, str]],
    layers: int | Sequence[int],
    concept: str = "concept",
    read_at: str = "last",
    *,
    position: int = -1,
    chat_template: bool = False,
    batch_size: int = 16,
    layers_path: str | None = None,
    method: str = "mean_diff",
) -> VectorSet:
    """Steering vectors by contrastive activation addition (mean positive - mean negative).

    Args:
        model, tokenizer: a loaded model (`load`, or any transformers causal LM).
        pairs: a dataset name or path (as `vectors.dataset`), or `(positive, negative)` texts,
            or dicts in the pair form of `data.load_pairs` (CAA A/B pairs included).
        layers: decoder layer(s); a vector lives in the residual stream after its layer.
        concept: the name recorded in vector ids.
        read_at: last | answer | answer_mean (see `vectors.example_ids`).
        position: token read with `read_at="last"` in text pairs (-1 = last).
        chat_template: wrap each example in the tokenizer's chat template.
        batch_size: examples per forward pass.
        layers_path: dotted path to the decoder layers if auto-detection fails.
        method: mean_diff | pca_diff | pca_center | logistic (as `vectors.method`).

    Returns:
        A `VectorSet` (`.vectors[layer]`, `.norm(layer)`, `.resid_norms`); save it with
        `steersweep.vectors.save(vs, "v.safetensors")` for `vectors=file`.
    """
    from steersweep.vectors.directions import compute_caa

    layer_list = [layers] if isinstance(layers, int) else [int(x) for x in layers]
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return compute_caa(
        model, tokenizer, _pairs(pairs), layer_list, concept, position, batch_size, chat_template, layers_path, name,
        read_at, method,
    )  # fmt: skip


def _settings(model, n: int, layer, alpha, vectors: Vectors, layers_path: str | None) -> list[tuple]:
    """Per row (layer, alpha, vector), from scalars or one value per row."""
    import torch

    from steersweep.core.errors import ConfigError, VectorError
    from steersweep.hooks.layers import get_layers
    from steersweep.vectors.vectorset import VectorSet

    layers = [layer] * n if isinstance(layer, int) else [int(x) for x in layer]
    alphas = [alpha] * n if isinstance(alpha, (int, float)) else [float(x) for x in alpha]
    if len(layers) != n or len(alphas) != n:
        raise ConfigError(f"{n} rows but {len(layers)} layers and {len(alphas)} alphas: give one, or one per row")
    n_layers = len(get_layers(model, layers_path))
    hidden = getattr(model.config, "hidden_size", None)
    table = vectors.vectors if isinstance(vectors, VectorSet) else vectors
    out = []
    for layer_, alpha_ in zip(layers, alphas, strict=True):
        if not 0 <= layer_ < n_layers:
            raise ConfigError(f"layer {layer_} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        if isinstance(table, torch.Tensor):
            v = table
        elif layer_ in table:
            v = table[layer_]
        else:
            raise VectorError(f"no vector for layer {layer_}; the vectors have layers {sorted(table)}")
        if v.ndim != 1 or (hidden is not None and v.numel() != hidden):
            raise VectorError(
                f"vector for layer {layer_} has shape {tuple(v.shape)}; the model's hidden size is {hidden}"
            )
        out.append((layer_, float(alpha_), v))
    return out


def steer(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[str],
    layer: int | Sequence[int],
    alpha: float | Sequence[float],
    vectors: Vectors,
    max_new_tokens: int = 32,
    *,
    positions: str = "all",
    mode: str = "add",
    chat_template: str = "auto",
    system_prompt: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    layers_path: str | None = None,
) -> list[str]:
    """Steered completions of a batch of prompts, each row with its own (layer, alpha) if wanted.

    The sweep's generator (`generation.generate_rows`): KV cache, per-row steering, prompts in the
    chat template when the tokenizer has one (`chat_template="auto"`), neutral greedy decoding.

    Args:
        model, tokenizer: a loaded model (`load`, or any transformers causal LM).
        prompts: one prompt or a list.
        layer, alpha: one for every row, or one per prompt; alpha 0 is the unsteered model.
        vectors: a `VectorSet`, `{layer: tensor}`, or one tensor used at any layer.
        max_new_tokens: tokens generated per completion.
        positions: all | prompt | generated (last prompt token onward) | from:K (as `steering.positions`).
        mode: add | ablate | ablate_add | norm_preserving (as `steering.mode`).
        chat_template: auto | on | off (as `generation.chat_template`).
        system_prompt: system message for the chat template.
        do_sample, temperature, top_p, seed: sampling; each row's seed derives from `seed` and its
            (prompt, layer, alpha, repeat), so a row samples alike in any batch.
        batch_size: rows per `generate` call (halved while the device runs out of memory).
        layers_path: dotted path to the decoder layers if auto-detection fails.

    Returns:
        The completions (text after the prompt, special tokens dropped), in prompt order.
    """
    from steersweep.core.config import CHAT_TEMPLATES, GenerationConfig
    from steersweep.core.errors import ConfigError, PromptError
    from steersweep.generation.decode import generate_rows
    from steersweep.inputs.encoding import encode_prompts, over_context
    from steersweep.model.memory import generate_with_backoff
    from steersweep.runs.grid import cell_seed

    rows = [prompts] if isinstance(prompts, str) else list(prompts)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be > 0")
    _check_steering(positions, mode)
    if chat_template not in CHAT_TEMPLATES:
        raise ConfigError(
            f"chat_template={chat_template}: use {', '.join(CHAT_TEMPLATES[:-1])} or {CHAT_TEMPLATES[-1]}"
        )
    if not rows:
        return []
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
        chat_template=chat_template, system_prompt=system_prompt,
    )  # fmt: skip
    steering = _settings(model, len(rows), layer, alpha, vectors, layers_path)
    ids = encode_prompts(tokenizer, rows, gen)
    too_long, ctx = over_context(model, dict(enumerate(ids)), max_new_tokens)
    if too_long:
        raise PromptError(
            f"prompt {too_long[0]} plus max_new_tokens={max_new_tokens} exceeds the model's context of {ctx}"
        )
    seeds = None
    if do_sample:
        seen: Counter = Counter()
        seeds = []
        for p, (layer_, alpha_, _) in zip(rows, steering, strict=True):
            seeds.append(cell_seed(seed, "api", layer_, alpha_, p, seen[(p, layer_, alpha_)]))
            seen[(p, layer_, alpha_)] += 1
    out: list[str] = []

    def run(chunk: list[int]):
        return generate_rows(
            model, tokenizer, [ids[i] for i in chunk], [(*steering[i], mode) for i in chunk], gen,
            [seeds[i] for i in chunk] if seeds else None, positions, layers_path,
        )  # fmt: skip

    # chunks of batch_size rows, halved on out-of-memory (the sweep's back-off); rows keep their order
    generate_with_backoff(
        run, list(range(len(rows))), max(1, batch_size), lambda c, o, s: out.extend(x.text for x in o)
    )
    return out


@contextlib.contextmanager
def steering(
    model: Any,
    vectors: Vectors,
    *,
    layer: int | Sequence[int],
    alpha: float | Sequence[float],
    mode: str = "add",
    positions: str = "all",
    layers_path: str | None = None,
) -> Iterator[None]:
    """Steer the model's own forward passes while the block runs, with the sweep's hook
    (`hooks.row_deltas` + `hooks.steer`): `model.generate`, a forward, anything that runs the layers.

        with ss.steering(model, vs, layer=14, alpha=4.0):           # every row of any batch
            out = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=32)
        with ss.steering(model, vs, layer=[10, 14], alpha=[0, 2]):  # row b of a 2-row batch: its own
            logits = model(**batch).logits

    The hooks are removed when the block ends, also when it raises.

    Args:
        model: a loaded model (`load`, or any transformers causal LM).
        vectors: a `VectorSet` (`compute_vectors`), `{layer: tensor}`, or one tensor used at any layer.
        layer, alpha: one for every row (a batch of any size), or one per batch row (the batch
            must then have that many rows); alpha 0 is the unsteered model.
        mode: add | ablate | ablate_add | norm_preserving (as `steering.mode`).
        positions: all | prompt | generated (as `steering.positions`). With prompt or generated the
            block's first forward is taken as the prompt: one `generate` call per block. For from:K,
            which needs each row's prompt length, use `steer`.
        layers_path: dotted path to the decoder layers if auto-detection fails.

    Raises:
        ConfigError, VectorError: a layer out of range, a missing vector, lists of other lengths.
    """
    from steersweep.core.errors import ConfigError
    from steersweep.hooks.rows import row_deltas
    from steersweep.hooks.rows import steer as hooked

    _check_steering(positions, mode)
    if positions.startswith("from:"):
        raise ConfigError(f"positions={positions} needs each row's prompt length: use steersweep.steer for it")
    per_row = [len(x) for x in (layer, alpha) if not isinstance(x, (int, float))]
    if len(set(per_row)) > 1:
        raise ConfigError(
            f"layer has {per_row[0]} values and alpha {per_row[1]}: give one value, or one per batch row, each"
        )
    if per_row:
        rows = [(*r, mode) for r in _settings(model, max(per_row), layer, alpha, vectors, layers_path)]
        deltas = row_deltas(rows, positions)
    else:
        rows = [(*r, mode) for r in _settings(model, 1, layer, alpha, vectors, layers_path)]
        deltas = row_deltas(rows, positions, every_row=True)
    with hooked(model, deltas, layers_path):
        yield


def _check_steering(positions: str, mode: str) -> None:
    """One line saying what to use, before any forward (the grammar lives in hooks)."""
    from steersweep.core.errors import ConfigError
    from steersweep.hooks.rows import MODES, POSITIONS_HELP, parse_positions

    try:
        parse_positions(positions)
    except ValueError:
        raise ConfigError(f"positions={positions}: {POSITIONS_HELP}") from None
    if mode not in MODES:
        raise ConfigError(f"mode={mode}: use one of {', '.join(MODES)}")
