"""Reference implementations that ours is checked and benchmarked against.

`seed_loop_generate` is the workaround of field report 02: a full forward pass per new token, no
KV cache, one cell at a time. It is slow by design, and exact: greedy tokens from it define what a
steered completion must be.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steersweep.hooks.rows import row_deltas, steer


@torch.inference_mode()
def seed_loop_generate(
    model,
    prompt_ids: Sequence[int],
    layer: int,
    alpha: float,
    vector: torch.Tensor,
    max_new_tokens: int,
    eos_ids: set[int] = frozenset(),
    layers_path: str | None = None,
) -> list[int]:
    """Greedy tokens for one cell by recomputing the whole sequence at every step."""
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([list(prompt_ids)], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        with steer(model, row_deltas([(layer, alpha, vector)]), layers_path):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        tok = int(logits.argmax(-1))
        new.append(tok)
        if tok in eos_ids:
            break
        ids = torch.cat([ids, torch.tensor([[tok]], device=device)], dim=1)
    return new
