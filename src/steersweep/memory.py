"""Memory: rows one generate call can hold, and out-of-memory back-off.

Kept apart from generation so the decode loop and the memory planning can change independently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from .faults import fault_point

log = logging.getLogger(__name__)


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs across all layers (keys + values)."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def row_bytes(config, seq_len: int, dtype_bytes: int = 2) -> int:
    """Memory one batch row needs during generation: its KV cache plus prefill activations.

    Activations at prefill: a few hidden-size and MLP-width buffers per token, plus one row of
    float32 logits per step (generate keeps only the last position's logits).
    """
    inter = getattr(config, "intermediate_size", 4 * config.hidden_size)
    act = seq_len * (4 * config.hidden_size + 2 * inter) * dtype_bytes
    logits = 2 * config.vocab_size * 4
    return kv_bytes_per_token(config, dtype_bytes) * seq_len + act + logits


def free_bytes(model) -> int:
    """Memory left for generation on the tightest device the model uses."""
    devices = {p.device for p in model.parameters()}
    free = []
    for d in devices:
        if d.type == "cuda":
            f, _ = torch.cuda.mem_get_info(d)
            free.append(int(f * 0.9))
    if not free:
        from .runtime import available_ram

        free.append(int(available_ram() * 0.5))
    return min(free)


def rows_that_fit(model, seq_len: int, cap: int) -> int:
    """Rows per generate call that the free memory holds at this sequence length (at most `cap`)."""
    dtype_bytes = next(model.parameters()).element_size()
    per_row = row_bytes(model.config, seq_len, dtype_bytes)
    return max(1, min(cap, free_bytes(model) // max(per_row, 1)))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def generate_with_backoff(run_batch, rows: Sequence, batch_size: int, on_done, timeout_s: float = 0.0) -> int:
    """Run `run_batch(chunk)` over `rows` in chunks; on out-of-memory halve the chunk and retry.

    `on_done(chunk, outputs, seconds)` is called after every finished chunk (so results are written
    as they come). Returns the final batch size. No row is lost: a failed chunk is retried whole.
    """
    from .runtime import watchdog

    i = 0
    while i < len(rows):
        chunk = rows[i : i + batch_size]
        t0 = time.perf_counter()
        try:
            with watchdog(timeout_s, f"generate batch of {len(chunk)} rows", announce=False):
                fault_point("batch")
                outputs = run_batch(chunk)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e) or batch_size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            log.warning(
                "out of memory with %d rows per batch: retrying with %d",
                len(chunk),
                batch_size,
            )
            continue
        on_done(chunk, outputs, time.perf_counter() - t0)
        i += len(chunk)
    return batch_size
