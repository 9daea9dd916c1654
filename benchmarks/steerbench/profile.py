"""Where a decoding step's time goes: one steered step of a batch under torch.profiler.

Run for a missed target only. Shares are of the profiled step's wall time: self time of GEMM ops,
attention ops, all other aten ops and (CPU only) the time outside any aten op (Python, hooks,
dispatch).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

from .machine import timed
from .workload import Workload


def _category(name: str) -> str:
    n = name.lower()
    if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm") or any(
        k in n for k in ("gemm", "cutlass", "mkldnn_matmul", "sgemm")
    ):
        return "gemm"
    if any(k in n for k in ("scaled_dot_product", "flash", "attention", "softmax", "fmha")):
        return "attention"
    return "other_ops"


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for the block: torch's profiler (kineto) prints a line per start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_step(model, tok, w: Workload, group: list[int], device: torch.device) -> dict:
    """Prefill `group`'s rows (steered), time a decoding step unprofiled (best of 3), profile one more."""
    from torch.profiler import ProfilerActivity, profile

    from steersweep.hooks.forward import shared_forward
    from steersweep.hooks.rows import row_deltas, steer
    from steersweep.inputs.encoding import model_inputs, pad_id_of, position_ids

    enc = model_inputs(w.ids(group), pad_id_of(tok), device)
    mask = enc["attention_mask"]
    cuda = device.type == "cuda"
    deltas = row_deltas(w.steering(group))
    with torch.inference_mode(), steer(model, deltas):
        # as generate_rows runs it: shared below the layers that steer rows apart
        out, prefill_s = timed(lambda: shared_forward(model, deltas, **enc, use_cache=True, logits_to_keep=1), device)
        cache = out.past_key_values
        nxt = out.logits[:, -1].float().argmax(-1, keepdim=True)  # as the decode loop: float32 logits

        def step():
            nonlocal mask, nxt
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = position_ids(mask)[:, -1:]
            o = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            nxt = o.logits[:, -1].float().argmax(-1, keepdim=True)

        wall = min(timed(step, device)[1] for _ in range(3))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with quiet_stderr(), profile(activities=acts) as prof:
            _, prof_wall = timed(step, device)
    events = prof.key_averages()

    def self_us(e) -> float:
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)

    shares = {"gemm": 0.0, "attention": 0.0, "other_ops": 0.0}
    for e in events:
        shares[_category(e.key)] += self_us(e)
    op_us = sum(shares.values())
    prof_us = prof_wall * 1e6
    top = sorted(events, key=self_us, reverse=True)[:10]
    return {
        "rows": len(group),
        "prefill_seconds": prefill_s,
        "prefill_tokens": int(enc["input_ids"].numel()),
        "step_seconds_unprofiled": wall,
        "step_seconds_profiled": prof_wall,
        "share_of_profiled_step": {
            **{k: v / prof_us for k, v in shares.items()},
            "outside_ops": max(0.0, 1 - op_us / prof_us) if not cuda else None,
        },
        "top_ops": [
            {"op": e.key, "calls": int(e.count), "self_ms": round(self_us(e) / 1e3, 3), "share": self_us(e) / prof_us}
            for e in top
        ],
    }


def describe(prof: dict) -> str:
    """One line: step time and where it goes."""
    sh = prof["share_of_profiled_step"]
    parts = [f"GEMM {sh['gemm']:.0%}", f"attention {sh['attention']:.0%}", f"other aten ops {sh['other_ops']:.0%}"]
    if sh.get("outside_ops") is not None:
        parts.append(f"outside aten ops (Python, hooks, dispatch) {sh['outside_ops']:.0%}")
    top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in prof["top_ops"][:3])
    return f"{prof['step_seconds_unprofiled'] * 1e3:.1f} ms; " + ", ".join(parts) + f"; top ops: {top}"
