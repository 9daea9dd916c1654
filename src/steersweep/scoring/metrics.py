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

import math
import re
from collections.abc import Sequence

import torch

from steersweep.hooks.forward import batch_done, cache_argument, prompt_cache, steered_forwards
from steersweep.hooks.rows import row_key
from steersweep.inputs.encoding import position_ids

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
