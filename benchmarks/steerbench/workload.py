"""The workloads: sweep cells (layer x alpha x prompt), their token ids and steering vectors.

Two workloads run on the same loaded model:
- main: greedy, EOS suppressed until T tokens, so every method makes exactly the same tokens;
- eos: sampled short answers (temperature 1, a seed per row) with a large max_new_tokens, where
  most rows stop early and static batching keeps decoding finished rows until the longest ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHORT_ANSWERS = Path(__file__).with_name("short_answers.jsonl")  # the EOS-heavy workload's prompts

Steering = tuple[int, float, torch.Tensor]  # (layer, alpha, vector): one row of generate_rows


@dataclass(frozen=True)
class Cell:
    layer: int
    alpha: float
    prompt: int  # index into Workload.prompt_ids
    seed: int = 0  # sampling seed (sampled workloads only)


@dataclass
class Method:
    """Timing and tokens of one generation method on one workload."""

    name: str
    impl: str
    calls: int = 0
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    out: dict[int, list[int]] = field(default_factory=dict)  # cell index -> new token ids (EOS excluded)

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, group: list[int], outs: list[list[int]], seconds: float) -> None:
        """Record one call that generated `outs` for the cells `group`."""
        for i, o in zip(group, outs, strict=True):
            self.out[i] = o
            self.tokens += len(o)
        self.calls += 1
        self.rows += len(group)
        self.seconds += seconds

    def summary(self) -> dict:
        return {"impl": self.impl, "calls": self.calls, "rows": self.rows, "tokens": self.tokens,
                "seconds": self.seconds, "tok_per_s": self.tok_per_s}  # fmt: skip


@dataclass
class Workload:
    name: str
    prompt_ids: list[list[int]]
    cells: list[Cell]
    vectors: dict[int, torch.Tensor]
    tokens: int  # max_new_tokens (exactly this many when EOS is suppressed)
    sampled: bool = False

    def steering(self, group: list[int]) -> list[Steering]:
        return [(self.cells[i].layer, self.cells[i].alpha, self.vectors[self.cells[i].layer]) for i in group]

    def ids(self, group: list[int]) -> list[list[int]]:
        return [self.prompt_ids[self.cells[i].prompt] for i in group]

    def seeds(self, group: list[int]) -> list[int] | None:
        return [self.cells[i].seed for i in group] if self.sampled else None

    def settings(self) -> list[list[int]]:
        """Cell indices grouped by (layer, alpha): one group per call of the per-setting method."""
        groups: dict[tuple[int, float], list[int]] = {}
        for i, c in enumerate(self.cells):
            groups.setdefault((c.layer, c.alpha), []).append(i)
        return list(groups.values())

    def batches(self, size: int) -> list[list[int]]:
        """Cell indices cut into consecutive batches of `size` (0 = all in one)."""
        n = len(self.cells)
        size = size or n
        return [list(range(s, min(s + size, n))) for s in range(0, n, size)]

    def distinct(self, group: list[int]) -> int:
        """Rows of `group` that generate_rows decodes: it makes identical rows once (alpha 0 is the same
        unsteered completion on every layer; sampled rows differ by seed)."""
        return len({self._row(i) for i in group})

    def _row(self, i: int) -> tuple:
        """What makes cell i's row distinct in generate_rows (alpha 0 is one row on every layer)."""
        c = self.cells[i]
        return c.prompt, None if c.alpha == 0 else (c.layer, c.alpha), c.seed if self.sampled else None

    def prefill_layer_rows(self, group: list[int], n_layers: int) -> int:
        """Decoder-layer rows the prompt pass of `group` computes in generate_rows: its distinct rows,
        each layer once per distinct state entering it (`steersweep.hooks.Trunk`)."""
        from steersweep.hooks.rows import row_deltas
        from steersweep.hooks.trunk import Trunk

        rows: dict[tuple, int] = {}  # distinct rows, as generate_rows dedupes them
        for i in group:
            rows.setdefault(self._row(i), i)
        kept = list(rows.values())
        trunk = Trunk.plan([self.cells[i].prompt for i in kept], row_deltas(self.steering(kept)), n_layers)
        if trunk is None:
            return len(kept) * n_layers
        return sum(max(c) + 1 for c in trunk.classes[:n_layers])

    @property
    def padded_prompt_len(self) -> int:
        return max(len(p) for p in self.prompt_ids)

    def describe(self) -> dict:
        return {
            "prompts": len(self.prompt_ids),
            "alphas": sorted({c.alpha for c in self.cells}),
            "layers": sorted({c.layer for c in self.cells}),
            "cells": len(self.cells),
            "max_new_tokens": self.tokens,
            "padded_prompt_len": self.padded_prompt_len,
            "decoding": "sampled (temperature 1, a seed per row)" if self.sampled else "greedy",
        }


def load_model(path: Path, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) from a local checkpoint folder, left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return model, tok


def sentiment_vectors(model, tok, layers: list[int]) -> dict[int, torch.Tensor]:
    """Mean-difference (CAA) sentiment vectors from the shipped pairs, one per layer."""
    from steersweep.inputs.datasets import load_pairs
    from steersweep.vectors.directions import compute_caa

    return dict(compute_caa(model, tok, load_pairs("sentiment_pairs"), sorted(set(layers)), "sentiment").vectors)


def build(
    name: str, tok, prompts: list[str], layers: list[int], alphas: list[float], vectors, tokens: int,
    sampled: bool = False, seed: int = 0,
) -> Workload:  # fmt: skip
    """Every (layer, alpha, prompt) cell; sampled cells get seeds seed, seed+1, ..."""
    from omegaconf import OmegaConf

    from steersweep.core.config import GenerationConfig
    from steersweep.inputs.encoding import encode_prompts

    gen = OmegaConf.structured(GenerationConfig(max_new_tokens=tokens))
    prompt_ids = encode_prompts(tok, prompts, gen)
    grid = [(layer, alpha, p) for layer in layers for alpha in alphas for p in range(len(prompts))]
    cells = [Cell(layer, alpha, p, seed + k) for k, (layer, alpha, p) in enumerate(grid)]
    return Workload(name, prompt_ids, cells, {layer: vectors[layer] for layer in layers}, tokens, sampled)


def generation_config(w: Workload, tokens: int | None = None):
    """The GenerationConfig generate_rows gets for this workload."""
    from omegaconf import OmegaConf

    from steersweep.core.config import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=tokens or w.tokens, do_sample=w.sampled, temperature=1.0, top_p=1.0)
    return OmegaConf.structured(cfg)


@contextlib.contextmanager
def min_new_tokens(model, n: int | None) -> Iterator[None]:
    """Set `model.generation_config.min_new_tokens` (EOS masked until n tokens) for the block.

    generate_rows inherits the model's generation config, so this is how every method is made to
    generate exactly T tokens in the main workload; None lets rows stop at EOS.
    """
    old = model.generation_config.min_new_tokens
    model.generation_config.min_new_tokens = n
    try:
        yield
    finally:
        model.generation_config.min_new_tokens = old


def evenly(n: int, k: int) -> list[int]:
    """k indices spread over range(n)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
