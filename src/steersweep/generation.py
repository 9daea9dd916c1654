"""Batched steered generation: many sweep cells per `generate` call, KV cache on, no autograd.

Each batch row carries its own (layer, alpha, vector). Sampling is made batch-invariant: each row
draws Gumbel noise from its own seeded generator after transformers' temperature and top-p
warpers, and the argmax of noisy logits is an exact sample from the warped distribution. So a
row's completion depends on its cell's seed only, not on which rows share its batch; a resumed or
re-sharded sweep reproduces the same samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .config import GenerationConfig
from .encoding import encode_prompts  # noqa: F401 (moved to encoding; re-exported for callers)
from .hooks import row_deltas, steer

log = logging.getLogger(__name__)


class PromptError(ValueError):
    """A prompt cannot be used as configured."""


def use_chat_template(tokenizer, mode: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise PromptError("generation.chat_template=on but the tokenizer has no chat template: set it to auto or off")
    return has if mode == "auto" else mode == "on"


def left_pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask): `encoding.model_inputs`' padding."""
    from .encoding import model_inputs

    enc = model_inputs(ids, pad_id)
    return enc["input_ids"], enc["attention_mask"]


class RowSeededSampler(LogitsProcessor):
    """Temperature and top-p (transformers' warpers), then per-row Gumbel noise.

    With greedy decoding on top, argmax(warped logits + Gumbel) samples each row from its warped
    distribution using only that row's generator.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for w in self.warpers:
            scores = w(input_ids, scores)
        u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.gens])
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        return scores.float() + gumbel.to(scores.device)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    n_new_tokens: int
    stop_reason: str  # eos | length


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def generate_rows(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    steering: Sequence[tuple[int, float, torch.Tensor]],
    gen: GenerationConfig,
    seeds: Sequence[int] | None = None,
    positions: str = "all",
    layers_path: str | None = None,
    shared_prefill: bool = True,
) -> list[Completion]:
    """One `generate` call for a batch of rows, each steered by its own (layer, alpha, vector).

    Args:
        prompt_ids: token ids per row (already templated).
        steering: per row (layer, alpha, vector); alpha 0 leaves the row unsteered.
        seeds: per-row sampling seeds (required when `gen.do_sample`).
        positions: "all" or "generated" (last prompt position onward).
        shared_prefill: with positions="generated", run each distinct prompt's unsteered prefix
            once and give every row a copy of its KV cache (rows of one prompt differ only from
            the last prompt token on).

    Identical rows are generated once: alpha 0 is the same unsteered completion whatever the
    layer, so a sweep over L layers would otherwise decode each greedy baseline L times.
    """
    keys = [
        (tuple(p), None if a == 0 else (layer, float(a), id(v)), seeds[i] if gen.do_sample and seeds else None)
        for i, (p, (layer, a, v)) in enumerate(zip(prompt_ids, steering, strict=True))
    ]
    first: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    if len(first) < len(keys):
        idx = list(first.values())
        out = generate_rows(
            model, tokenizer, [prompt_ids[i] for i in idx], [steering[i] for i in idx], gen,
            [seeds[i] for i in idx] if seeds is not None else None, positions, layers_path, shared_prefill,
        )  # fmt: skip
        by_key = dict(zip(first, out, strict=True))
        return [by_key[k] for k in keys]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, mask = left_pad(prompt_ids, pad)
    device = model.get_input_embeddings().weight.device
    kwargs: dict = {
        "max_new_tokens": gen.max_new_tokens,
        "do_sample": False,
        "pad_token_id": pad,
        "use_cache": True,
    }
    if gen.do_sample:
        if seeds is None:
            raise ValueError("sampling needs one seed per row")
        kwargs["logits_processor"] = LogitsProcessorList([RowSeededSampler(seeds, gen.temperature, gen.top_p)])
    if positions == "generated" and shared_prefill and input_ids.shape[1] > 1:
        kwargs["past_key_values"] = _shared_prefix_cache(model, prompt_ids, pad, device)
    with steer(model, row_deltas(steering, positions), layers_path):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
    new = out[:, input_ids.shape[1] :].cpu()
    eos = _eos_ids(model, tokenizer)
    results = []
    for row in new.tolist():
        stop = "length"
        for i, t in enumerate(row):
            if t in eos:
                row, stop = row[:i], "eos"
                break
        results.append(Completion(tokenizer.decode(row, skip_special_tokens=True), row, len(row), stop))
    return results


def _shared_prefix_cache(model, prompt_ids: Sequence[Sequence[int]], pad: int, device):
    """KV cache of every row's prompt minus its last token, computed once per distinct prompt.

    Left padding keeps the alignment: dropping the last column of the padded batch gives each
    prompt's prefix padded to the same width. Position ids follow the attention mask, as
    `generate` computes them, so the cache equals what generate's own prefill would store.
    """
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(tuple(p), len(index)) for p in prompt_ids]
    uniq = list(index)
    width = max(len(p) for p in prompt_ids)
    ids, mask = left_pad(uniq, pad)
    if ids.shape[1] < width:  # keep the same width as the full batch
        extra = width - ids.shape[1]
        ids = torch.cat([torch.full((len(uniq), extra), pad), ids], 1)
        mask = torch.cat([torch.zeros((len(uniq), extra), dtype=mask.dtype), mask], 1)
    ids, mask = ids[:, :-1], mask[:, :-1]
    from .encoding import position_ids

    pos = position_ids(mask)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                use_cache=True, logits_to_keep=1)  # fmt: skip
    cache = out.past_key_values
    cache.reorder_cache(torch.tensor(rows))  # one copy per row, on each layer's own device
    return cache
