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
from helpers.behavior import AB, CONT, reference_logprob, written_out
from helpers.models import tiny_llama

from steersweep.scoring import behavior as M


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
