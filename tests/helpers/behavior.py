"""Behaviour items written out plainly, one at a time: the reference that scoring.behavior is checked against."""

from __future__ import annotations

import torch

from steersweep.inputs import datasets as data

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
