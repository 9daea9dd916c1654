"""The generation methods compared, one module each; `run_rows` is the shared generate_rows driver.

Every method is warmed up once (a 2-token call on its first group) before it is timed, under
`torch.inference_mode()`; it returns a `Method` with the new token ids of every cell it ran.
"""

from __future__ import annotations

import inspect

import torch

from ..machine import timed
from ..workload import Method, Workload, generation_config, min_new_tokens


def has_engine() -> bool:
    """Whether `generate_rows` takes `engine=` (the decode loop with EOS compaction, or HF generate)."""
    from steersweep.generation.decode import generate_rows

    return "engine" in inspect.signature(generate_rows).parameters


def run_rows(
    name: str, impl: str, model, tok, w: Workload, groups: list[list[int]], device: torch.device,
    engine: str | None = None,
) -> Method:  # fmt: skip
    """One `steersweep.generation.generate_rows` call per group of cell indices.

    Args:
        engine: passed as `engine=` when given and generate_rows takes it; None = its default.
    """
    from steersweep.generation.decode import generate_rows

    kw = {"engine": engine} if engine is not None and has_engine() else {}
    m = Method(name, impl + ("" if engine is None or kw else " (generate_rows has no engine= yet: ran its default)"))

    def call(group: list[int], tokens: int | None = None):
        gen = generation_config(w, tokens)
        return generate_rows(model, tok, w.ids(group), w.steering(group), gen, w.seeds(group), **kw)

    forced = model.generation_config.min_new_tokens
    with min_new_tokens(model, 2 if forced else None):
        call(groups[0], 2)  # warm-up
    for group in groups:
        outs, s = timed(lambda group=group: call(group), device)
        m.add(group, [o.token_ids for o in outs], s)
    return m
