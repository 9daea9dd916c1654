"""Batched steered generation: many sweep cells per `generate` call, KV cache on, no autograd.

Each batch row carries its own (layer, alpha, vector). Sampling is made batch-invariant: each row
draws Gumbel noise from its own seeded generator after transformers' temperature and top-p
warpers, and the argmax of noisy logits is an exact sample from the warped distribution. So a
row's completion depends on its cell's seed only, not on which rows share its batch; a resumed or
re-sharded sweep reproduces the same samples.
"""

from __future__ import annotations

import logging
import time
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
from .faults import fault_point
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


# ---------------------------------------------------------------------------------------------
# Batch sizing


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs across all layers (keys + values)."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def row_bytes(config, seq_len: int, dtype_bytes: int = 2) -> int:
    """Memory one batch row needs during generation: its KV cache plus prefill activations.

    Activations at prefill: a few hidden-size and MLP-width buffers per token, plus one row of
    float32 logits per step (generate keeps only the last position's logits).
    """
    inter = getattr(config, "intermediate_size", 4 * config.hidden_size)
    act = seq_len * (4 * config.hidden_size + 2 * inter) * dtype_bytes
    logits = 2 * config.vocab_size * 4
    return kv_bytes_per_token(config, dtype_bytes) * seq_len + act + logits


def free_bytes(model) -> int:
    """Memory left for generation on the tightest device the model uses."""
    devices = {p.device for p in model.parameters()}
    free = []
    for d in devices:
        if d.type == "cuda":
            f, _ = torch.cuda.mem_get_info(d)
            free.append(int(f * 0.9))
    if not free:
        from .runtime import available_ram

        free.append(int(available_ram() * 0.5))
    return min(free)


def rows_that_fit(model, seq_len: int, cap: int) -> int:
    """Rows per generate call that the free memory holds at this sequence length (at most `cap`)."""
    dtype_bytes = next(model.parameters()).element_size()
    per_row = row_bytes(model.config, seq_len, dtype_bytes)
    return max(1, min(cap, free_bytes(model) // max(per_row, 1)))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def generate_with_backoff(run_batch, rows: Sequence, batch_size: int, on_done, timeout_s: float = 0.0) -> int:
    """Run `run_batch(chunk)` over `rows` in chunks; on out-of-memory halve the chunk and retry.

    `on_done(chunk, outputs, seconds)` is called after every finished chunk (so results are written
    as they come). Returns the final batch size. No row is lost: a failed chunk is retried whole.
    """
    from .runtime import watchdog

    i = 0
    while i < len(rows):
        chunk = rows[i : i + batch_size]
        t0 = time.perf_counter()
        try:
            with watchdog(timeout_s, f"generate batch of {len(chunk)} rows", announce=False):
                fault_point("batch")
                outputs = run_batch(chunk)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e) or batch_size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            log.warning(
                "out of memory with %d rows per batch: retrying with %d",
                len(chunk),
                batch_size,
            )
            continue
        on_done(chunk, outputs, time.perf_counter() - t0)
        i += len(chunk)
    return batch_size
