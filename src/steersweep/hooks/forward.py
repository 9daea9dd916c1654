"""The steered forward pass shared by generation and scoring: rows with a common steering prefix
run once (trunk), the prompt's KV cache, masked row deltas for scoring tails, batch progress."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import torch

from steersweep.hooks.rows import RowDelta, parse_positions, row_deltas, steer
from steersweep.hooks.trunk import shared_trunk
from steersweep.inputs.encoding import model_inputs, position_ids


def accepts(model, name: str) -> bool:
    """Whether the model's forward takes keyword `name`."""
    import inspect

    return name in inspect.signature(model.forward).parameters


def cache_argument(model) -> str:
    """The forward keyword of the KV cache: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def cache_of(out):
    """The KV cache a forward pass returned, under either name."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


BATCH_INPUTS = ("input_ids", "attention_mask", "position_ids")


def shared_forward(model, deltas, layers_path: str | None = None, share: bool = True, **inputs):
    """`model(**inputs)` for one full forward of a batch (a prompt pass), each decoder layer run once
    per distinct state entering it (`hooks.shared_trunk`): the model gets one row per distinct input,
    its output and KV cache have every row. `deltas` are the batch's steering (`steer` must be
    active); `share=False` is the plain forward."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with shared_trunk(model, ids, mask, deltas, layers_path) if share else contextlib.nullcontext() as trunk:
        if trunk is None:
            return model(**inputs)
        fed = {k: v[trunk.feed.to(v.device)] if k in BATCH_INPUTS else v for k, v in inputs.items()}
        out = model(**fed)
        cache = cache_of(out)
        if cache is not None:
            trunk.widen_cache(cache)
        return out


def _trim_padding(mask: torch.Tensor, cache):
    """Drop leading mask columns that no live row attends to (from the mask and every cache layer).

    Only for caches made of plain full-attention layers, whose tensors are [B, heads, T, dim]; other
    caches (sliding windows, linear attention) keep their padding.
    """
    from transformers.cache_utils import DynamicLayer

    used = mask.any(0).nonzero()
    k = int(used[0]) if len(used) else 0
    layers = getattr(cache, "layers", None)
    if k == 0 or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return mask, cache
    for layer in layers:
        layer.keys, layer.values = layer.keys[:, :, k:], layer.values[:, :, k:]
    return mask[:, k:], cache


def prompt_cache(model, prompt_ids: Sequence[Sequence[int]], pad: int, device, drop_last: bool = False):
    """The KV cache of every row's prompt, each distinct prompt computed once, one entry per row.

    Prompts are left-padded to the longest, so rows stay aligned; with `drop_last` the cache holds
    each prompt minus its last token (the decode loop feeds that token as its first step). Position
    ids follow the attention mask, as `generate` computes them, so the cache equals what generate's
    own prefill would store. Returns (cache, the rows' attention mask over the cached columns,
    float32 logits at each row's last cached position).
    """
    index: dict[tuple[int, ...], int] = {}
    rows = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prompt_ids])
    enc = model_inputs(list(index), pad)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if drop_last:
        ids, mask = ids[:, :-1], mask[:, :-1]
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids(mask).to(device),
                use_cache=True, logits_to_keep=1)  # fmt: skip
    cache = cache_of(out)
    cache.reorder_cache(rows)  # one copy per row, on each layer's own device
    return cache, mask[rows], out.logits[:, -1].float()[rows.to(out.logits.device)]


class MaskedRowDelta(RowDelta):
    """A layer's per-row steering (any mode) applied only where `mask[b, t]` is 1, for one full
    (non-incremental) forward.

    `RowDelta` tells the prefill from decoding steps by counting calls; a scoring forward sees the
    whole sequence at once, so which positions are steered is given here as a [B, T] mask.
    """

    def __init__(self, rd: RowDelta, mask: torch.Tensor):
        super().__init__(rd.delta, "all", rd.units, rd.renorm, rd.lengths)
        self.fixed = mask.bool()

    def mask(self, h: torch.Tensor) -> torch.Tensor | None:
        fixed = self._sel(self.fixed)
        if h.shape[:2] != fixed.shape:
            raise RuntimeError(f"steering mask of shape {tuple(fixed.shape)} for activations {tuple(h.shape)}")
        return fixed

    def _extra(self, b: int) -> tuple:
        return (self.fixed[b].numpy().tobytes(),)


def steering_mask(attention_mask: torch.Tensor, tails: Sequence[int], positions: str) -> torch.Tensor:
    """[B, T] positions steered in a left-padded scoring forward of context + answer (`tails[b]`
    answer tokens), matching what generation steers when the answer is what gets generated.

    all: every real token. prompt: the context (generation's prefill). generated: the context's
    last token (whose output predicts the first answer token) and every answer token. from:K: real
    token K onward.
    """
    kind, k = parse_positions(positions)
    real = attention_mask.float()
    if kind == "all":
        return real
    width = attention_mask.shape[1]
    cols = torch.arange(width)[None, :]
    answer_start = torch.tensor([width - int(n) for n in tails])[:, None]
    if kind == "prompt":
        return (cols < answer_start).float() * real
    if kind == "generated":
        return (cols >= answer_start - 1).float() * real
    index = cols - (width - attention_mask.sum(1, keepdim=True))  # token index within the row
    return (index >= k).float() * real


def masked_row_deltas(rows: Sequence[tuple], mask: torch.Tensor) -> dict[int, MaskedRowDelta]:
    """`hooks.row_deltas` for one full forward, steering only where `mask` is 1."""
    return {layer: MaskedRowDelta(rd, mask) for layer, rd in row_deltas(rows).items()}


_ON_BATCH: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "steersweep_on_batch", default=None
)


@contextlib.contextmanager
def on_batches(fn: Callable[[int, int], None]) -> Iterator[None]:
    """Call `fn(sequences done, sequences in all)` after every forward batch of the scoring
    functions run inside the block (the sweep's progress line moves during long scoring phases)."""
    token = _ON_BATCH.set(fn)
    try:
        yield
    finally:
        _ON_BATCH.reset(token)


def batch_done(done: int, total: int) -> None:
    fn = _ON_BATCH.get()
    if fn is not None:
        fn(done, total)


def steered_forwards(
    model,
    seqs: Sequence[Sequence[int]],
    tails: Sequence[int],
    pad_id: int | None,
    steering: Sequence[tuple] | None,
    batch_size: int,
    layers_path: str | None,
    positions: str,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], torch.Tensor]]:
    """Batched full forwards of `seqs`, each row under its own steering on `positions` (see
    `steering_mask`; `tails[i]` answer tokens end row i): yields (the rows' indices, their model
    inputs, logits of the last max(tail) + 1 positions) per batch.

    Steered rows are taken in token order, so the rows of one sequence (one item under many
    settings) share a batch, and its prompt pass computes each layer once per distinct state
    (`hooks.shared_trunk`): below the first layer a setting steers, all settings of an item are one
    row. Which rows share a batch is a function of the inputs alone.
    """
    device = model.get_input_embeddings().weight.device
    order = list(range(len(seqs)))
    if steering:
        order.sort(key=lambda i: (len(seqs[i]), tuple(seqs[i])))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        inputs = model_inputs([seqs[i] for i in idx], pad_id)
        rows = [steering[i] for i in idx] if steering else []
        k = [tails[i] for i in idx]
        deltas = masked_row_deltas(rows, steering_mask(inputs["attention_mask"], k, positions)) if rows else {}
        on_device = {n: v.to(device) for n, v in inputs.items()}
        with steer(model, deltas, layers_path):
            out = shared_forward(model, deltas, layers_path, bool(rows), **on_device, use_cache=False,
                                 logits_to_keep=max(k) + 1)  # fmt: skip
        logits = out.logits
        yield idx, inputs, logits
        batch_done(s + len(idx), len(order))
