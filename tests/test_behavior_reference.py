"""behavior_prob against an independent reference written plainly.

The reference takes one item and one answer at a time: it tokenizes context + answer together,
finds the answer's tokens from the character offsets (the tokens that end past the context), runs
one unpadded full forward with its own steering hook, and sums log-softmax over the answer tokens.
No padding, no batching, no shared forwards, nothing from steersweep but the item files.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama

from steersweep.inputs import datasets as data
from steersweep.scoring import behavior as M

CONT = data.load_jsonl("sentiment_continuations", ("prefix", "positive", "negative"))
AB = data.load_jsonl("sentiment_ab", ("question", "A", "B", "positive"))


def written_out(tok, it: dict, fmt: str, chat: bool) -> tuple[str, bool, str, str]:
    """(context text, add special tokens, matching answer, other answer) of one item."""
    if fmt == "continuation":
        return it["prefix"], True, it["positive"], it["negative"]
    q = f"{it['question']}\n\n(A) {it['A']}\n(B) {it['B']}\n\nAnswer with A or B."
    other = "B" if it["positive"] == "A" else "A"
    if chat:
        msgs = [{"role": "user", "content": q}]
        return (
            tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "(",
            False,
            it["positive"],
            other,
        )
    return q + "\nAnswer: (", True, it["positive"], other


def reference_logprob(model, tok, context: str, special: bool, answer: str, layer, alpha, vec, positions, norm):
    enc = tok(context + answer, add_special_tokens=special, return_offsets_mapping=True)
    ids, spans = enc["input_ids"], enc["offset_mapping"]
    first = next(i for i, (_, end) in enumerate(spans) if end > len(context))  # first answer token
    start = 0 if positions == "all" else first - 1  # generated: the context's last token onward

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[0, start:] += alpha * vec.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        handle.remove()
    logp = torch.log_softmax(logits, dim=-1)
    lps = [float(logp[t - 1, ids[t]]) for t in range(first, len(ids))]
    return sum(lps) / len(lps) if norm else sum(lps)


def reference_behavior_prob(model, tok, items, fmt, chat, layer, alpha, vec, positions, norm=False) -> float:
    ps = []
    for it in items:
        context, special, match, other = written_out(tok, it, fmt, chat)
        lm = reference_logprob(model, tok, context, special, match, layer, alpha, vec, positions, norm)
        lo = reference_logprob(model, tok, context, special, other, layer, alpha, vec, positions, norm)
        ps.append(math.exp(lm) / (math.exp(lm) + math.exp(lo)))
    return sum(ps) / len(ps)


def check(model, tok, fmt, positions, settings, n_items, norm=False, tol=1e-5):
    items = (CONT if fmt == "continuation" else AB)[:n_items]
    chat = bool(tok.chat_template)
    enc = M.encode_behavior_items(tok, items, fmt, chat)
    got = M.behavior_probs(model, enc, settings, tok.pad_token_id, 5, None, positions, norm)
    want = [reference_behavior_prob(model, tok, items, fmt, chat, *s, positions, norm) for s in settings]
    for (mean, _), ref in zip(got, want, strict=True):
        assert mean == pytest.approx(ref, abs=tol), (fmt, positions, got, want)
    return want


@pytest.mark.parametrize("fmt", ["continuation", "ab"])
@pytest.mark.parametrize("positions", ["all", "generated"])
@pytest.mark.parametrize("norm", [False, True])
def test_batched_equals_reference_on_a_tiny_model(tokenizer, fmt, positions, norm):
    model = tiny_llama()
    torch.manual_seed(1)
    v1, v2 = torch.randn(32), torch.randn(32)
    settings = [(1, 3.0, v1), (2, -4.0, v2), (1, 0.0, v1), (3, 0.0, v2)]
    want = check(model, tokenizer, fmt, positions, settings, 7, norm)
    assert abs(want[0] - want[2]) > 1e-4  # the steering moves the score


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["continuation", "ab"])
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_batched_equals_reference_on_the_embedded_model(real_model, tokenizer, fmt, positions):
    torch.manual_seed(0)
    v = torch.randn(real_model.config.hidden_size)
    v = 20.0 * v / v.norm()
    want = check(real_model, tokenizer, fmt, positions, [(14, -1.0, v), (14, 0.0, v), (14, 1.0, v)], 4, tol=1e-4)
    assert abs(want[0] - want[2]) > 1e-3


def test_positions_generated_leaves_the_context_unsteered(tokenizer):
    """Steering only the context's last token and the answer differs from steering everything."""
    model = tiny_llama()
    v = torch.randn(32) * 3
    enc = M.encode_behavior_items(tokenizer, CONT[:5], "continuation", False)
    all_, gen = (M.behavior_probs(model, enc, [(1, 2.0, v)], 2, positions=p)[0][0] for p in ("all", "generated"))
    assert abs(all_ - gen) > 1e-5
