"""(a) The field report's workaround: a full forward pass per new token, no KV cache, one cell at a time.

Slow by design, so it is timed on a few cells spread over the grid and reported per generated
token. It cannot suppress EOS, so its tokens are compared with the grid's up to its first EOS.
"""

from __future__ import annotations

import torch

from ..machine import timed
from ..workload import Method, Workload


def run(model, w: Workload, idx: list[int], device: torch.device) -> Method:
    from steersweep.generation.baselines import seed_loop_generate

    m = Method("seed_loop", "steersweep.generation.baselines.seed_loop_generate (no KV cache, 1 cell)")

    def call(i: int, tokens: int) -> list[int]:
        (layer, alpha, v), ids = w.steering([i])[0], w.ids([i])[0]
        return seed_loop_generate(model, ids, layer, alpha, v, tokens)

    call(idx[0], 2)  # warm-up
    for i in idx:
        out, s = timed(lambda i=i: call(i, w.tokens), device)
        m.add([i], [out], s)
    return m
