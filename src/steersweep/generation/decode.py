"""Batched steered generation: many sweep cells per `generate` call, KV cache on, no autograd.

Each batch row carries its own (layer, alpha, vector). Sampling is made batch-invariant: each row
draws Gumbel noise from its own seeded generator after transformers' temperature and top-p
warpers, and the argmax of noisy logits is an exact sample from the warped distribution. So a
row's completion depends on its cell's seed only, not on which rows share its batch; a resumed or
re-sharded sweep reproduces the same samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from steersweep.core.config import GenerationConfig
from steersweep.hooks.forward import _trim_padding, accepts, cache_argument, cache_of, prompt_cache, shared_forward
from steersweep.hooks.layers import get_layers
from steersweep.hooks.rows import row_deltas, row_key, steer
from steersweep.hooks.trunk import contiguous_head
from steersweep.inputs.encoding import model_inputs, position_ids


def left_pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask): `encoding.model_inputs`' padding."""
    enc = model_inputs(ids, pad_id)
    return enc["input_ids"], enc["attention_mask"]


class TopP(LogitsProcessor):
    """Nucleus (top-p) filtering: keep the most probable tokens until their mass reaches `top_p`, and
    every token as probable as the last one kept; the rest get -inf.

    Without ties this is transformers' `TopPLogitsWarper` (equal on every case of
    `tests/test_generation.py::test_top_p_equals_transformers_warper`). With ties at the cut, common
    in logits computed in bf16, the warper keeps whichever tied tokens its sort happens to put last;
    here all of them are kept, so the result does not depend on sort order, vocabulary order or batch.
    The warper also sorts the whole vocabulary every step (160-200 ms for 96 rows of a 49k vocabulary
    on a 2-core CPU, twice the model's own decoding step); the `k` most probable tokens held the cut on
    every step of the embedded model at temperature 0.7 with k = 256, so `topk` finds it (7 ms), and
    only rows whose cut lies beyond them are sorted in full, with the warper's own arithmetic.
    """

    def __init__(self, top_p: float, k: int = 256):
        self.top_p, self.k = float(top_p), int(k)

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.FloatTensor) -> torch.FloatTensor:
        # the top k, descending: the last token needed is the first whose running mass reaches top_p
        top, idx = scores.topk(min(self.k, scores.shape[-1]), dim=-1)
        probs = scores.softmax(-1).gather(-1, idx)
        last = (probs.cumsum(-1) < self.top_p).sum(-1, keepdim=True)
        short = (last >= top.shape[-1]).squeeze(-1)  # the cut lies beyond the top k
        cut = top.gather(-1, last.clamp_max(top.shape[-1] - 1))  # in logits: ties at the cut all stay
        if bool(short.any()):  # those rows as the warper does it: ascending sort, drop mass <= 1 - top_p
            asc = scores[short].sort(-1).values
            dropped = (asc.softmax(-1).cumsum(-1) <= 1 - self.top_p).sum(-1, keepdim=True)
            cut[short] = asc.gather(-1, dropped.clamp_max(asc.shape[-1] - 1))
        return scores.masked_fill(scores < cut, -float("inf"))


class RowSeededSampler(LogitsProcessor):
    """Temperature and top-p (transformers' warpers), then per-row Gumbel noise.

    With greedy decoding on top, argmax(warped logits + Gumbel) samples each row from its warped
    distribution using only that row's generator. The generators live on the model's device, so
    no B x vocab block of random numbers crosses from the CPU each step.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device | str = "cpu"):
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_p < 1.0:
            self.warpers.append(TopP(top_p))
        self.device = torch.device(device)
        self.gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (finished rows leave the decode loop's batch)."""
        self.gens = [self.gens[i] for i in rows.tolist()]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for w in self.warpers:
            scores = w(input_ids, scores)
        n = scores.shape[-1]
        u = torch.stack([torch.rand(n, generator=g, device=self.device) for g in self.gens])
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
    engine: str = "loop",
    on_step: Callable[[int, int, int], None] | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> list[Completion]:
    """Generate a batch of rows in one decode, each steered by its own (layer, alpha, vector).

    Args:
        prompt_ids: token ids per row (already templated).
        steering: per row (layer, alpha, vector); alpha 0 leaves the row unsteered.
        seeds: per-row sampling seeds (required when `gen.do_sample`).
        positions: "all" or "generated" (last prompt position onward).
        shared_prefill: share the prompt pass between rows of one prompt. With positions="generated",
            each distinct prompt's unsteered prefix runs once and every row gets a copy of its KV
            cache (rows of one prompt differ only from the last prompt token on); otherwise each
            decoder layer runs once per distinct state entering it (`hooks.shared_trunk`: rows of
            one prompt are computed together up to the first layer that steers them apart).
        engine: "loop" (default): our decode loop, which drops rows that finished (EOS) from the
            batch and trims padding no live row needs; "generate": one transformers `generate`
            call (static batching: finished rows are decoded until the last row ends). Token-equal
            in float32 (tests/test_generation.py).
        on_step: called after every decoding step with (tokens made, rows finished, step index).
        on_layer: called after each decoder layer of the prompt pass with (layer done, layers): the
            first forward of a large batch reads every prompt and can take seconds.

    Identical rows are generated once: alpha 0 is the same unsteered completion whatever the
    layer, so a sweep over L layers would otherwise decode each greedy baseline L times.
    """
    keys = [
        (tuple(p), row_key(st), seeds[i] if gen.do_sample and seeds else None)  # row_key: mode-aware
        for i, (p, st) in enumerate(zip(prompt_ids, steering, strict=True))
    ]
    first: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    if len(first) < len(keys):
        idx = list(first.values())
        out = generate_rows(
            model, tokenizer, [prompt_ids[i] for i in idx], [steering[i] for i in idx], gen,
            [seeds[i] for i in idx] if seeds is not None else None, positions, layers_path, shared_prefill,
            engine, on_step, on_layer,
        )  # fmt: skip
        by_key = dict(zip(first, out, strict=True))
        return [by_key[k] for k in keys]
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if gen.do_sample and seeds is None:
        raise ValueError("sampling needs one seed per row")
    contiguous_head(model)  # a model loaded elsewhere (the Python API) may be frozen too
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, mask = left_pad(prompt_ids, pad)
    device = model.get_input_embeddings().weight.device
    eos = _eos_ids(model, tokenizer)
    sampler = RowSeededSampler(seeds, gen.temperature, gen.top_p, device) if gen.do_sample else None
    cache = None
    if positions == "generated" and shared_prefill and input_ids.shape[1] > 1:
        with _layer_ticks(model, layers_path, on_layer):
            cache = prompt_cache(model, prompt_ids, pad, device, drop_last=True)[0]
    deltas = row_deltas(steering, positions, [len(p) for p in prompt_ids])  # lengths: positions from:K
    share = shared_prefill and cache is None  # the prompt pass computes each layer once per distinct state

    def prompt_forward(**inputs):
        with _layer_ticks(model, layers_path, on_layer):
            return shared_forward(model, deltas, layers_path, share, **inputs)

    with steer(model, deltas, layers_path):
        if engine == "generate":
            rows = _generate(model, input_ids.to(device), mask.to(device), gen, sampler, cache, pad, eos)
        else:
            rows = _decode(model, input_ids.to(device), mask.to(device), gen, sampler, cache, pad, eos,
                           list(deltas.values()), on_step, prompt_forward)  # fmt: skip
    return [Completion(tokenizer.decode(r, skip_special_tokens=True), r, len(r), stop) for r, stop in rows]


ENGINES = ("loop", "generate")


def _generate(model, input_ids, mask, gen, sampler, cache, pad, eos) -> list[tuple[list[int], str]]:
    """transformers' `generate`, static batching: the reference the decode loop is tested against."""
    kwargs: dict = {"max_new_tokens": gen.max_new_tokens, "do_sample": False, "pad_token_id": pad, "use_cache": True}
    if sampler is not None:
        kwargs["logits_processor"] = LogitsProcessorList([sampler])
    if cache is not None:
        kwargs[cache_argument(model)] = cache  # `cache` from transformers 5.24
    out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    rows = []
    for row in out[:, input_ids.shape[1] :].tolist():
        stop = "length"
        for i, t in enumerate(row):
            if t in eos:
                row, stop = row[:i], "eos"
                break
        rows.append((row, stop))
    return rows


def _decode(
    model, input_ids, mask, gen, sampler, cache, pad, eos, deltas, on_step, prompt_forward=None
) -> list[tuple[list[int], str]]:
    """Greedy (or Gumbel-sampled) decoding with a KV cache that drops finished rows.

    Each step does what `generate` does for one token (float32 logits of the last position,
    min_new_tokens, the row sampler, argmax). A row that emits EOS stops; once an eighth of the live
    rows have stopped they leave the batch (the cache, the mask, the steering deltas and the
    sampler's generators keep the other rows), and mask columns that no live row attends to are
    trimmed. Which rows leave when is a function of the batch alone, so a batch decodes the same way
    on every run. `prompt_forward(**inputs)`: what runs the first (prompt) forward instead of the
    model (`shared_forward`, with progress ticks).
    """
    cache_arg = cache_argument(model)
    keep_last = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}  # older heads return all
    n = input_ids.shape[0]
    min_new = int(getattr(model.generation_config, "min_new_tokens", None) or 0)
    eos_list = sorted(eos)
    pos = position_ids(mask)
    if cache is not None:  # the prefix is cached: feed the last prompt token only
        step_ids, step_pos = input_ids[:, -1:], pos[:, -1:]
    else:
        step_ids, step_pos = input_ids, pos
    tokens: list[list[int]] = [[] for _ in range(n)]
    stops = ["length"] * n
    live = list(range(n))  # original row index of each batch row
    stopped = [False] * n  # per batch row: emitted EOS (still in the batch until compaction)
    for step in range(gen.max_new_tokens):
        forward = prompt_forward if step == 0 and prompt_forward is not None else model
        out = forward(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                      **{cache_arg: cache}, **keep_last)  # fmt: skip
        cache = cache_of(out)
        logits = out.logits[:, -1].to(dtype=torch.float32, copy=True)
        del out
        if step < min_new and eos_list:
            logits[:, eos_list] = float("-inf")
        if sampler is not None:
            logits = sampler(None, logits)
        nxt = logits.argmax(-1)
        finished = 0
        for b, t in enumerate(nxt.tolist()):
            if stopped[b]:
                continue
            if t in eos:
                stopped[b], stops[live[b]] = True, "eos"
                finished += 1
            else:
                tokens[live[b]].append(t)
        if on_step is not None:
            on_step(len(live) - sum(stopped) + finished, finished, step)
        if all(stopped) or step + 1 == gen.max_new_tokens:
            break
        if sum(stopped) * 8 >= len(live):
            keep = torch.tensor([b for b, s in enumerate(stopped) if not s])
            cache.batch_select_indices(keep)
            for rd in deltas:
                rd.keep(keep)
            if sampler is not None:
                sampler.keep(keep)
            mask, nxt, step_pos = mask[keep.to(mask.device)], nxt[keep.to(nxt.device)], step_pos[keep.to(mask.device)]
            live = [live[b] for b in keep.tolist()]
            stopped = [False] * len(live)
            mask, cache = _trim_padding(mask, cache)
        done = torch.tensor(stopped, device=nxt.device)
        step_ids = torch.where(done, torch.full_like(nxt, pad), nxt)[:, None]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        step_pos = step_pos[:, -1:] + 1
    return [(t, s) for t, s in zip(tokens, stops, strict=True)]


@contextlib.contextmanager
def _layer_ticks(model, layers_path: str | None, on_layer: Callable[[int, int], None] | None):
    """Call `on_layer(i, n)` after decoder layer i (1-based) of n, while the context is open."""
    if on_layer is None:
        yield
        return
    layers = get_layers(model, layers_path)
    n = len(layers)

    def make(i: int):
        return lambda *_: on_layer(i, n)  # returns None: the layer's output is unchanged

    handles = [layer.register_forward_hook(make(i)) for i, layer in enumerate(layers, 1)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
