"""Optional LLM judge: a chat model loaded by config rates each completion with a rubric.

The score is the expected rating under the judge's next-token distribution over the digits 1-9
(no sampling, so it is deterministic and smooth), in column `judge_score`. The rubric is encoded
by `encoding.encode` (chat template when the judge has one), and the digit ids are the ones the
judge would read right after that prompt (the suffix of the joint encoding), not digits encoded
alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steersweep.core.config import JudgeConfig
from steersweep.inputs.encoding import Source, encode, model_inputs, pad_id_of, user_messages
from steersweep.model.dtypes import torch_dtype
from steersweep.model.memory import with_backoff


class Judge:
    def __init__(self, cfg: JudgeConfig, layers_device_map: str = "auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(cfg.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.model_path, dtype=torch_dtype(cfg.dtype), device_map=layers_device_map
        ).eval()
        probe = self._source("", "")
        digits = [list(encode(self.tok, probe, str(d)).answer) for d in range(1, 10)]
        if any(len(d) != 1 for d in digits):
            raise ValueError(f"judge tokenizer splits digits into several tokens: {digits}; choose another judge")
        self.digit_ids = torch.tensor([d[0] for d in digits])

    def _source(self, prompt: str, completion: str) -> Source:
        text = self.cfg.rubric.format(prompt=prompt, completion=completion)
        return user_messages(text) if getattr(self.tok, "chat_template", None) else text

    def _encode(self, prompt: str, completion: str) -> list[int]:
        return list(encode(self.tok, self._source(prompt, completion)).ids)

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 16) -> list[float]:
        """Expected rating (1-9) of each completion; out of memory halves the batch and starts over."""
        return with_backoff(lambda bs: self._score(prompts, completions, bs), batch_size, "judge")

    @torch.inference_mode()
    def _score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int) -> list[float]:
        pad = pad_id_of(self.tok)
        device = self.model.get_input_embeddings().weight.device
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            ids = [self._encode(p, c) for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size],
                                                      strict=True)]  # fmt: skip
            logits = self.model(**model_inputs(ids, pad, device), logits_to_keep=1).logits
            p = torch.softmax(logits[:, -1].float()[:, self.digit_ids.to(logits.device)], dim=-1).cpu()
            out.extend((p * torch.arange(1, 10, dtype=torch.float32)).sum(-1).tolist())
        return out
