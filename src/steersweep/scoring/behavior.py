"""Behaviour probability: A/B or continuation items scored under steering, per item and summarised."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from steersweep.core.errors import EncodingError
from steersweep.hooks.rows import row_key
from steersweep.inputs.encoding import Encoded, encode
from steersweep.scoring.metrics import score_tails

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
