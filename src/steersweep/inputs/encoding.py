"""One encoder for every consumer: (text or chat messages, answer) -> token ids, and padded batches;
and whether a prompt goes through the chat template (`use_chat_template`).

Generation prompts, CAA examples, behaviour items, perplexity and the judge all turn their inputs
into ids here, and every left-padded forward builds its inputs here.

- A `str` source is raw text: the tokenizer adds its special tokens (BOS) as it was trained to.
- A list of `{"role", "content"}` messages goes through the tokenizer's chat template, rendered as
  text and then encoded with `add_special_tokens=False` (the template writes BOS itself when the
  model wants one), with the assistant's generation prompt unless told otherwise; `prefill` is text
  the assistant turn already starts with (e.g. "(" before an A/B letter).
- An answer is never encoded alone. Context + answer is encoded jointly, and the answer is the
  suffix of that joint encoding after the longest prefix it shares with the context's own encoding
  (lm-evaluation-harness' context/continuation split, made safe for merges across the boundary).
  SentencePiece encodes " delicious" alone as `['▁', '▁delicious']` and "A" alone as `▁A`, but the
  model reads `▁delicious` and `A` after "...was" and "(": the joint suffix is what it reads. When
  the tokenizer merges across the boundary (" (" + "A" -> " (A"), the merged token belongs to the
  answer, so the context kept is always a true prefix of the joint ids and nothing of the answer is
  lost.
- Padded batches are left-padded, and their position ids follow the attention mask (each row
  counts from 0 at its first real token), as `generate` does: absolute-position models (GPT-2,
  OPT) then give the same numbers padded or not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from steersweep.core.config import GenerationConfig
from steersweep.core.errors import EncodingError, PromptError


def use_chat_template(tokenizer, mode: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise PromptError("generation.chat_template=on but the tokenizer has no chat template: set it to auto or off")
    return has if mode == "auto" else mode == "on"


Messages = Sequence[Mapping[str, str]]
Source = str | Messages


@dataclass(frozen=True)
class Encoded:
    """Joint token ids of a context and its answer: `ids[:n_context]` is the context."""

    ids: tuple[int, ...]
    n_context: int

    @property
    def context(self) -> tuple[int, ...]:
        return self.ids[: self.n_context]

    @property
    def answer(self) -> tuple[int, ...]:
        return self.ids[self.n_context :]


def is_messages(source: Source) -> bool:
    return not isinstance(source, str)


def user_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A single user turn, after an optional system message."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": prompt})
    return msgs


def render(tokenizer, source: Source, *, add_generation_prompt: bool = True, prefill: str = "") -> tuple[str, bool]:
    """(text to encode, whether the tokenizer adds its special tokens) for a text or messages."""
    if not is_messages(source):
        if prefill:
            raise EncodingError("prefill is for chat messages; append it to the text instead")
        return source, True
    if not getattr(tokenizer, "chat_template", None):
        raise EncodingError("chat messages need a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(
        [dict(m) for m in source], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return text + prefill, False


def token_ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode(
    tokenizer, source: Source, answer: str = "", *, add_generation_prompt: bool = True, prefill: str = ""
) -> Encoded:
    """Joint ids of `source` (+ `answer`); the answer is the suffix the context's own ids do not cover.

    Args:
        source: raw text (special tokens added) or chat messages (template, generation prompt).
        answer: text that continues the context; "" gives the context alone (`n_context == len(ids)`).
        add_generation_prompt: with messages, end on the assistant's turn header.
        prefill: with messages, text the assistant turn starts with (part of the context).
    """
    text, special = render(tokenizer, source, add_generation_prompt=add_generation_prompt, prefill=prefill)
    ctx = token_ids(tokenizer, text, special)
    if not answer:
        return Encoded(tuple(ctx), len(ctx))
    joint = token_ids(tokenizer, text + answer, special)
    n = common_prefix(ctx, joint)
    if n == len(joint):
        raise EncodingError(f"answer {answer!r} adds no token after its context")
    return Encoded(tuple(joint), n)


def encode_prompts(tokenizer, prompts: Sequence[str], gen: GenerationConfig) -> list[list[int]]:
    """Token ids of each prompt: the chat template (with a generation prompt) when used, else raw."""
    chat = use_chat_template(tokenizer, gen.chat_template)
    return [list(encode(tokenizer, user_messages(p, gen.system_prompt) if chat else p).ids) for p in prompts]


# ---------------------------------------------------------------------------------------------
# Padded batches


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (padded positions are masked out either way)."""
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pid is not None:
            return int(pid)
    return 0


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that follow the mask: 0 at each row's first real token (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def model_inputs(ids: Sequence[Sequence[int]], pad_id: int | None, device=None) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids`, `attention_mask` and mask-following `position_ids` for a forward."""
    pad = 0 if pad_id is None else int(pad_id)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        if len(x):
            input_ids[i, width - len(x) :] = torch.tensor(list(x), dtype=torch.long)
            mask[i, width - len(x) :] = 1
    out = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids(mask)}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def over_context(model, prompt_ids: Mapping, max_new_tokens: int) -> tuple[list, int | None]:
    """The keys of `prompt_ids` whose prompt plus `max_new_tokens` exceeds the model's context
    (`max_position_embeddings`; none when the config does not say), and that context."""
    ctx = getattr(model.config, "max_position_embeddings", None)
    return [k for k, ids in prompt_ids.items() if ctx and len(ids) + max_new_tokens > ctx], ctx
