"""Optional LLM judge: a chat model loaded by config rates each completion with a rubric.

The score is the expected rating under the judge's next-token distribution over the digits 1-9
(no sampling, so it is deterministic and smooth), in column `judge_score`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import JudgeConfig
from .generation import left_pad


class Judge:
    def __init__(self, cfg: JudgeConfig, layers_device_map: str = "auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .loading import torch_dtype

        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(cfg.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.model_path, dtype=torch_dtype(cfg.dtype), device_map=layers_device_map
        ).eval()
        digits = [self.tok(str(d), add_special_tokens=False)["input_ids"] for d in range(1, 10)]
        if any(len(d) != 1 for d in digits):
            raise ValueError(f"judge tokenizer splits digits into several tokens: {digits}; choose another judge")
        self.digit_ids = torch.tensor([d[0] for d in digits])

    def _encode(self, prompt: str, completion: str) -> list[int]:
        text = self.cfg.rubric.format(prompt=prompt, completion=completion)
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(text)["input_ids"]

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 16) -> list[float]:
        """Expected rating (1-9) of each completion."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        device = self.model.get_input_embeddings().weight.device
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            ids, mask = left_pad([self._encode(p, c) for p, c in zip(prompts[i : i + batch_size],
                                                                      completions[i : i + batch_size], strict=True)], pad)  # fmt: skip
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1).logits
            p = torch.softmax(logits[:, -1].float()[:, self.digit_ids.to(logits.device)], dim=-1).cpu()
            out.extend((p * torch.arange(1, 10, dtype=torch.float32)).sum(-1).tolist())
        return out
