"""Scores per row, computed in the same job while the model is loaded.

- word rates: share of a completion's words found in each shipped word list (`word_rate_<list>`)
- regex counters: matches per completion of configured patterns (`regex_<name>`), e.g. emoji
- distinct-n: unique n-grams / n-grams of the completion's tokens (`distinct_1`, `distinct_2`)
- perplexity: of the completion given the prompt under the *unsteered* model (hooks off)
- behavior_prob: CAA behaviour probability p(matching) / (p(matching) + p(other)) over two-choice
  items, answers scored by total log-probability under the row's steering (no generation);
  `behavior_prob_sem` is its standard error over items.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from .hooks import row_deltas, steer

WORD = re.compile(r"[a-z']+")
EMOJI = r"[\U0001F300-\U0001FAFF\u2600-\u27BF]"
METRICS = ("word_rate", "distinct", "perplexity", "behavior_prob", "regex")


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


@torch.inference_mode()
def tail_logprobs(
    model,
    seqs: Sequence[Sequence[int]],
    tails: Sequence[int],
    pad_id: int,
    steering: Sequence[tuple[int, float, torch.Tensor]] | None = None,
    batch_size: int = 32,
    layers_path: str | None = None,
) -> list[list[float]]:
    """Log-probability of each of the last `tails[i]` tokens of `seqs[i]` given what precedes them.

    Rows may carry per-row steering (layer, alpha, vector), applied at every position.
    """
    from .generation import left_pad

    device = model.get_input_embeddings().weight.device
    out: list[list[float]] = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        k = tails[s : s + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        keep = max(max(k), 0) + 1
        rows = steering[s : s + batch_size] if steering else []
        with steer(model, row_deltas(rows), layers_path):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).cpu()  # position j predicts token j+1
        targets = ids[:, -keep + 1 :] if keep > 1 else ids[:, :0]
        lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [b, keep-1]
        for i, n in enumerate(k):
            out.append(lp[i, lp.shape[1] - n :].tolist() if n > 0 else [])
    return out


def perplexities(
    model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
    batch_size: int = 32, layers_path: str | None = None,
) -> list[float]:  # fmt: skip
    """Perplexity of each completion given its prompt, with no steering active."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    tails = [len(c) for c in completion_ids]
    lps = tail_logprobs(model, seqs, tails, pad_id, None, batch_size, layers_path)
    return [math.exp(-sum(lp) / len(lp)) if lp else float("nan") for lp in lps]


# ---------------------------------------------------------------------------------------------
# Behaviour probability


def encode_behavior_items(
    tokenizer, items: Sequence[dict], fmt: str, chat: bool
) -> list[tuple[list[int], list[int], list[int]]]:
    """Each item -> (context ids, matching-answer ids, other-answer ids).

    continuation: {"prefix", "positive", "negative"}; the answers continue the raw prefix.
    ab: {"question", "A", "B", "positive"}; the question and options go in the chat template (when
    the tokenizer has one) and the answers are the letters after an opening "(".
    """
    out = []
    for it in items:
        if fmt == "continuation":
            ctx = tokenizer(it["prefix"])["input_ids"]
            pos = tokenizer(it["positive"], add_special_tokens=False)["input_ids"]
            neg = tokenizer(it["negative"], add_special_tokens=False)["input_ids"]
        elif fmt == "ab":
            q = f"{it['question']}\n\n(A) {it['A']}\n(B) {it['B']}\n\nAnswer with A or B."
            if chat:
                text = (
                    tokenizer.apply_chat_template(
                        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
                    )
                    + "("
                )
                ctx = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ctx = tokenizer(q + "\nAnswer: (")["input_ids"]
            match = it["positive"]
            other = "B" if match == "A" else "A"
            pos = tokenizer(match, add_special_tokens=False)["input_ids"]
            neg = tokenizer(other, add_special_tokens=False)["input_ids"]
        else:
            raise ValueError(f"eval.behavior_format must be continuation or ab, got {fmt!r}")
        out.append((ctx, pos, neg))
    return out


def behavior_probs(
    model,
    encoded: Sequence[tuple[list[int], list[int], list[int]]],
    settings: Sequence[tuple[int, float, torch.Tensor]],
    pad_id: int,
    batch_size: int = 32,
    layers_path: str | None = None,
) -> list[tuple[float, float]]:
    """(mean, standard error) of p(matching) over items, for each steering setting.

    All settings x items x 2 answers go through batched forwards with per-row steering.
    """
    seqs, tails, steering = [], [], []
    for st in settings:
        for ctx, pos, neg in encoded:
            for ans in (pos, neg):
                seqs.append(ctx + ans)
                tails.append(len(ans))
                steering.append(st)
    lps = [sum(x) for x in tail_logprobs(model, seqs, tails, pad_id, steering, batch_size, layers_path)]
    out = []
    n = len(encoded)
    for s in range(len(settings)):
        block = lps[2 * n * s : 2 * n * (s + 1)]
        ps = [1.0 / (1.0 + math.exp(block[2 * i + 1] - block[2 * i])) for i in range(n)]
        mean = sum(ps) / n
        var = sum((p - mean) ** 2 for p in ps) / (n - 1) if n > 1 else 0.0
        out.append((mean, math.sqrt(var / n)))
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
