"""Scores per row, computed in the same job while the model is loaded.

- word rates: share of a completion's words found in each shipped word list (`word_rate_<list>`)
- regex counters: matches per completion of configured patterns (`regex_<name>`), e.g. emoji
- distinct-n: unique n-grams / n-grams of the completion's tokens (`distinct_1`, `distinct_2`)
- perplexity: of the completion given the prompt under the *unsteered* model (hooks off)
- behavior_prob: CAA behaviour probability p(matching) / (p(matching) + p(other)) over two-choice
  items = sigmoid(lp(matching) - lp(other)), each answer scored (no generation) by its total (or,
  length-normalised, mean) log-probability as the suffix of the jointly encoded context + answer
  (`encoding.encode`), under the row's steering on `steering.positions`; `behavior_prob_sem` is its
  standard error over items.
- next_token_kl: KL(steered || unsteered) of the next-token distribution at the last position of
  each sweep prompt, averaged over the prompts per setting (`next_token_kl_sem`: its standard error):
  the side effect quoted beside the behaviour.

Every forward here is left-padded with position ids that follow the mask (`encoding.model_inputs`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from .encoding import Encoded, EncodingError, encode, model_inputs, pad_id_of  # noqa: F401 (pad_id_of for callers)
from .hooks import RowDelta, parse_positions, row_deltas, row_key, steer

WORD = re.compile(r"[a-z']+")
EMOJI = r"[\U0001F300-\U0001FAFF\u2600-\u27BF]"
METRICS = ("word_rate", "distinct", "perplexity", "behavior_prob", "next_token_kl", "regex")


def word_rates(text: str, lists: dict[str, list[str]]) -> dict[str, float]:
    words = WORD.findall(text.lower())
    out = {}
    for name, vocab in lists.items():
        s = set(vocab)
        out[f"word_rate_{name}"] = sum(w in s for w in words) / len(words) if words else 0.0
    return out


def distinct_n(tokens: Sequence, n: int) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def regex_counts(text: str, patterns: dict[str, str]) -> dict[str, float]:
    return {f"regex_{k}": float(len(re.findall(p, text))) for k, p in patterns.items()}


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
    from .generation import shared_forward

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


@torch.inference_mode()
def score_tails(
    model,
    seqs: Sequence[Sequence[int]],
    tails: Sequence[int],
    pad_id: int | None,
    steering: Sequence[tuple[int, float, torch.Tensor]] | None = None,
    batch_size: int = 32,
    layers_path: str | None = None,
    positions: str = "all",
    alts: Sequence[int | None] | None = None,
) -> tuple[list[list[float]], list[float | None]]:
    """Log-probabilities of the last `tails[i]` tokens of `seqs[i]` given what precedes them.

    Rows are left-padded with position ids that follow the mask, and may carry per-row steering
    (layer, alpha, vector) on `positions` (see `steering_mask`). `alts[i]`, when given, is another
    token whose log-probability is read where the first tail token is predicted (a second
    one-token answer to the same context, scored in the same forward).

    Returns (per-row tail log-probs, per-row alt log-prob or None).
    """
    if any(n < 1 or n >= len(s) for s, n in zip(seqs, tails, strict=True)):
        raise ValueError("each scored tail needs at least one token and one token before it")
    alts = list(alts) if alts is not None else [None] * len(seqs)
    out: list[list[float]] = [[] for _ in seqs]
    alt_out: list[float | None] = [None] * len(seqs)
    for idx, inputs, logits in steered_forwards(
        model, seqs, tails, pad_id, steering, batch_size, layers_path, positions
    ):
        keep = logits.shape[1]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()  # entry j predicts token j+1
        lp = logp.gather(-1, inputs["input_ids"][:, -keep + 1 :].unsqueeze(-1)).squeeze(-1)  # [b, keep-1]
        for j, i in enumerate(idx):
            n = tails[i]
            out[i] = lp[j, keep - 1 - n :].tolist()
            alt_out[i] = None if alts[i] is None else float(logp[j, keep - 1 - n, int(alts[i])])
    return out, alt_out


def tail_logprobs(
    model,
    seqs: Sequence[Sequence[int]],
    tails: Sequence[int],
    pad_id: int | None,
    steering: Sequence[tuple[int, float, torch.Tensor]] | None = None,
    batch_size: int = 32,
    layers_path: str | None = None,
    positions: str = "all",
) -> list[list[float]]:
    """Log-probability of each of the last `tails[i]` tokens of `seqs[i]` (see `score_tails`)."""
    return score_tails(model, seqs, tails, pad_id, steering, batch_size, layers_path, positions)[0]


@torch.inference_mode()
def perplexities(
    model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int | None,
    batch_size: int = 32, layers_path: str | None = None,
) -> list[float]:  # fmt: skip
    """Perplexity of each completion given its prompt, with no steering active (nan when empty).

    The rows of one prompt (a sweep's settings) continue one KV cache of it: a batch reads each
    distinct prompt once (`generation.prompt_cache`), then every row's completion, right-padded.
    """
    from .encoding import position_ids
    from .generation import cache_argument, prompt_cache

    del layers_path  # nothing is steered
    device = model.get_input_embeddings().weight.device
    pad = 0 if pad_id is None else int(pad_id)
    out: list[float] = [float("nan")] * len(prompt_ids)
    idx = sorted((i for i, c in enumerate(completion_ids) if len(c)), key=lambda i: tuple(prompt_ids[i]))
    for s in range(0, len(idx), batch_size):
        chunk = idx[s : s + batch_size]
        cache, prompt_mask, first = prompt_cache(model, [prompt_ids[i] for i in chunk], pad, device)
        comps = [list(completion_ids[i]) for i in chunk]
        ids = torch.full((len(chunk), max(map(len, comps))), pad, dtype=torch.long)
        comp_mask = torch.zeros_like(ids)
        for j, c in enumerate(comps):
            ids[j, : len(c)], comp_mask[j, : len(c)] = torch.tensor(c), 1
        mask = torch.cat([prompt_mask, comp_mask], 1)
        pos = position_ids(mask)[:, prompt_mask.shape[1] :]
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       use_cache=True, **{cache_argument(model): cache}).logits  # fmt: skip
        del cache
        # token 0 is predicted at the prompt's last position, token j > 0 at completion position j - 1
        lp0 = torch.log_softmax(first.double(), -1).cpu().gather(-1, ids[:, :1])
        rest = torch.log_softmax(logits[:, :-1].float(), -1).cpu().gather(-1, ids[:, 1:, None]).squeeze(-1)
        lps = torch.cat([lp0, rest.double()], 1)
        for j, i in enumerate(chunk):
            nll = -float(lps[j, : len(comps[j])].sum()) / len(comps[j])
            out[i] = math.exp(nll) if nll < 700 else float("inf")
        batch_done(s + len(chunk), len(idx))
    return out


# ---------------------------------------------------------------------------------------------
# Behaviour probability


def ab_question(item: dict) -> str:
    return f"{item['question']}\n\n(A) {item['A']}\n(B) {item['B']}\n\nAnswer with A or B."


def encode_behavior_items(tokenizer, items: Sequence[dict], fmt: str, chat: bool) -> list[tuple[Encoded, Encoded]]:
    """Each item -> (matching, other): the joint encoding of its context with each answer.

    continuation: {"prefix", "positive", "negative"}; the answers continue the raw prefix.
    ab: {"question", "A", "B", "positive"}; the question and options go in the chat template (when
    `chat`) with the assistant turn opened by "(", else after "Answer: (" in raw text; the answers
    are the letters.
    The scored ids of an answer are the suffix of the jointly encoded context + answer
    (`encoding.encode`), i.e. exactly the tokens the model reads.
    """
    out = []
    for n, it in enumerate(items):
        if fmt == "continuation":
            source, prefill, match, other = it["prefix"], "", it["positive"], it["negative"]
        elif fmt == "ab":
            match = it["positive"]
            other = "B" if match == "A" else "A"
            if chat:
                source, prefill = [{"role": "user", "content": ab_question(it)}], "("
            else:
                source, prefill = ab_question(it) + "\nAnswer: (", ""
        else:
            raise ValueError(f"eval.behavior_format must be continuation or ab, got {fmt!r}")
        try:
            pair = (
                encode(tokenizer, source, match, prefill=prefill),
                encode(tokenizer, source, other, prefill=prefill),
            )
        except EncodingError as e:
            raise EncodingError(f"behaviour item {it.get('id', n)}: {e}") from None
        if min(p.n_context for p in pair) < 1:
            raise EncodingError(
                f"behaviour item {it.get('id', n)}: its answer starts at the first token, so nothing predicts it"
            )
        out.append(pair)
    return out


def sigmoid(x: float) -> float:
    """1 / (1 + exp(-x)) without overflow for any finite x."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def behavior_item_scores(
    model,
    encoded: Sequence[tuple[Encoded, Encoded]],
    settings: Sequence[tuple[int, float, torch.Tensor]],
    pad_id: int | None,
    batch_size: int = 32,
    layers_path: str | None = None,
    positions: str = "all",
    length_normalize: bool = False,
) -> list[list[tuple[float, float]]]:
    """Per setting, per item: (lp(matching), lp(other)); propensity = their difference, and the item's
    p(matching) = sigmoid(propensity) (`behavior_summary`).

    lp is an answer's total log-probability given its context under the setting's steering on
    `positions` (all, or generated: the context's last token and the answer), or its mean per
    answer token with `length_normalize`. All settings x items go through batched forwards with
    per-row steering; settings with alpha 0 are scored once, and two answers to one context of
    which one is a single token share a forward.
    """
    if not encoded:
        raise ValueError("no behaviour items to score")
    seqs: list[tuple[int, ...]] = []
    tails: list[int] = []
    alts: list[int | None] = []
    steering: list[tuple[int, float, torch.Tensor]] = []
    # where each (setting, item)'s two log-probs come from: (row, is_alt) per answer
    where: dict[tuple, tuple[tuple[int, bool], tuple[int, bool]]] = {}
    keys = [row_key(st) for st in settings]
    done: set = set()
    for key, st in zip(keys, settings, strict=True):
        if key in done:
            continue
        done.add(key)
        for i, (m, o) in enumerate(encoded):
            long_, short = (m, o) if len(m.answer) >= len(o.answer) else (o, m)
            if len(short.answer) == 1 and short.context == long_.context:
                row = len(seqs)
                seqs.append(long_.ids)
                tails.append(len(long_.answer))
                alts.append(short.answer[0])
                steering.append(st)
                where[(key, i)] = ((row, False), (row, True)) if long_ is m else ((row, True), (row, False))
            else:
                locs = []
                for enc in (m, o):
                    locs.append((len(seqs), False))
                    seqs.append(enc.ids)
                    tails.append(len(enc.answer))
                    alts.append(None)
                    steering.append(st)
                where[(key, i)] = (locs[0], locs[1])
    lps, alt_lps = score_tails(model, seqs, tails, pad_id, steering, batch_size, layers_path, positions, alts)

    def lp(loc: tuple[int, bool]) -> float:
        row, is_alt = loc
        if is_alt:
            return alt_lps[row]  # a one-token answer: sum == mean
        return sum(lps[row]) / len(lps[row]) if length_normalize else sum(lps[row])

    return [[(lp(where[(key, i)][0]), lp(where[(key, i)][1])) for i in range(len(encoded))] for key in keys]


def behavior_summary(scores: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(mean, standard error) over items of p(matching) = sigmoid(lp(matching) - lp(other)). The mean is
    numpy's, so it equals the mean of the item table's behavior_prob column (pandas) bit for bit."""
    ps = np.array([sigmoid(m - o) for m, o in scores], dtype=np.float64)
    n = len(ps)
    sem = float(ps.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return float(ps.mean()), sem


def behavior_probs(
    model,
    encoded: Sequence[tuple[Encoded, Encoded]],
    settings: Sequence[tuple[int, float, torch.Tensor]],
    pad_id: int | None,
    batch_size: int = 32,
    layers_path: str | None = None,
    positions: str = "all",
    length_normalize: bool = False,
) -> list[tuple[float, float]]:
    """(mean, standard error) over items of p(matching), per setting (`behavior_item_scores`)."""
    scores = behavior_item_scores(
        model, encoded, settings, pad_id, batch_size, layers_path, positions, length_normalize
    )
    return [behavior_summary(s) for s in scores]


# ---------------------------------------------------------------------------------------------
# Side effect: next-token KL from the unsteered model


@torch.inference_mode()
def next_token_kl(
    model,
    prompt_ids: Sequence[Sequence[int]],
    settings: Sequence[tuple],
    pad_id: int | None,
    batch_size: int = 32,
    layers_path: str | None = None,
    positions: str = "all",
) -> list[tuple[float, float]]:
    """(mean, standard error) over prompts of KL(steered || unsteered) of the next-token
    distribution at each prompt's last position, per setting (layer, alpha, vector[, mode]).

    The cost people quote beside the effect: how far the steering moves the model's prediction on
    prompts that are not about the concept. Steering covers the prompt as generation's prefill
    does under `positions`; alpha 0 settings are 0 without a forward.
    """
    if not prompt_ids:
        raise ValueError("no prompts to measure the next-token KL on")

    def last_logprobs(steering: Sequence[tuple] | None) -> torch.Tensor:
        seqs = [list(p) for p in prompt_ids] * (len(steering) // len(prompt_ids) if steering else 1)
        out = torch.empty(len(seqs), 0, dtype=torch.float64)
        batches = steered_forwards(model, seqs, [0] * len(seqs), pad_id, steering, batch_size, layers_path, positions)
        for idx, _, logits in batches:
            lp = torch.log_softmax(logits[:, -1].double(), dim=-1).cpu()  # small KLs: no cancellation
            if out.shape[1] == 0:
                out = torch.empty(len(seqs), lp.shape[1], dtype=torch.float64)
            out[idx] = lp
        return out

    base = last_logprobs(None)  # [P, V]
    keys = [row_key(st) for st in settings]
    uniq = {k: st for k, st in zip(keys, settings, strict=True) if k is not None}
    n = len(prompt_ids)
    kl: dict = {None: torch.zeros(n)}
    if uniq:
        rows = [st for st in uniq.values() for _ in range(n)]
        lq = last_logprobs(rows).reshape(len(uniq), n, -1)
        per = (lq.exp() * (lq - base[None])).sum(-1).clamp_min(0.0)  # [settings, prompts]
        kl.update(zip(uniq, per, strict=True))
    out = []
    for k in keys:
        v = kl[k].double()
        sem = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
        out.append((float(v.mean()), sem))
    return out


def text_metrics(completion: str, token_ids: Sequence[int], names: Sequence[str], lists, patterns) -> dict[str, float]:
    """The metrics that need only the completion."""
    m: dict[str, float] = {}
    if "word_rate" in names:
        m.update(word_rates(completion, lists))
    if "distinct" in names:
        m["distinct_1"] = distinct_n(token_ids, 1)
        m["distinct_2"] = distinct_n(token_ids, 2)
    if patterns:
        m.update(regex_counts(completion, patterns))
    return m
