"""Memory: rows one generate call can hold, and out-of-memory back-off.

Kept apart from generation so the decode loop and the memory planning can change independently.

Rows per call are planned per device: each device holds the KV cache of the decoder layers that
*run* there, plus the activations of the layers it runs, plus the logits where the LM head runs.
accelerate runs layers placed on the CPU (or disk) on the main GPU, the first GPU of the map, so
their KV cache lives there, not in CPU RAM (`accelerate.big_modeling.dispatch_model`). The batch is
the minimum over devices of (free bytes there // bytes one row costs there): `rows_on_devices` is
that, a pure function; `rows_that_fit` reads the live figures of a loaded model and calls it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from steersweep.core.errors import LayerLookupError
from steersweep.core.faults import fault_point
from steersweep.core.runtime import cpu_budget, watchdog
from steersweep.hooks.layers import get_layers

T = TypeVar("T")

log = logging.getLogger(__name__)

HEADROOM_USE = 0.9  # share of a GPU's free memory given to rows: the rest absorbs allocator fragmentation


def kv_bytes_per_layer_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs in one decoder layer (keys + values)."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * kv_heads * head_dim * dtype_bytes


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs across all layers (keys + values)."""
    return config.num_hidden_layers * kv_bytes_per_layer_token(config, dtype_bytes)


def activation_bytes(config, seq_len: int, dtype_bytes: int = 2) -> int:
    """Transient bytes of one row in one layer at prefill: a few hidden-size and MLP-width buffers
    per token (only one layer runs at a time, so a device running any layer needs this once)."""
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return seq_len * (4 * config.hidden_size + 2 * inter) * dtype_bytes


def logits_bytes(config) -> int:
    """One row's logits per step (generate keeps the last position only), float32, plus a copy."""
    return 2 * config.vocab_size * 4


def row_bytes(config, seq_len: int, dtype_bytes: int = 2) -> int:
    """Memory one batch row needs during generation on a single device holding the whole model."""
    return (
        kv_bytes_per_token(config, dtype_bytes) * seq_len
        + activation_bytes(config, seq_len, dtype_bytes)
        + logits_bytes(config)
    )


# ---------------------------------------------------------------------------------------------
# Where layers run


def device_key(d) -> str:
    """One spelling per device: 0 / "0" / "cuda" / torch.device("cuda", 0) -> "cuda:0"; "cpu", "disk"."""
    if isinstance(d, torch.device):
        return f"{d.type}:{d.index or 0}" if d.type == "cuda" else str(d)
    s = str(d)
    if s.isdigit():
        return f"cuda:{s}"
    return "cuda:0" if s == "cuda" else s


@dataclass(frozen=True)
class Share:
    """What runs on one device: decoder layers (their KV cache lives there) and the LM head."""

    layers: int = 0
    head: bool = False


def placed_on(device_map: Mapping[str, object], name: str):
    """The device a module is placed on: that of the longest key of `device_map` that is the module
    or a parent of it (how accelerate reads a map; "" is the whole model)."""
    key = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if key is None:
        raise ValueError(f"module {name!r} is not in the device map (keys: {list(device_map)[:5]}...)")
    return device_map[key]


def execution_shares(device_map: Mapping[str, object], layer_names: Sequence[str], head_name: str) -> dict[str, Share]:
    """Per execution device, the layers and head that run there.

    Each module is placed as `placed_on` says. Modules placed on "cpu" or "disk" run on
    the main device (the lowest-numbered GPU in the map) when there is one, as accelerate's
    dispatch does: their weights are copied there per forward, and their KV cache is made there.
    """
    cuda = sorted((d for d in map(device_key, device_map.values()) if d.startswith("cuda:")), key=lambda d: int(d[5:]))
    others = sorted({device_key(v) for v in device_map.values()} - {"cpu", "disk", "meta", *cuda})
    main = (cuda or others or ["cpu"])[0]

    def runs_on(name: str) -> str:
        d = device_key(placed_on(device_map, name))
        return main if d in ("cpu", "disk") else d

    layers: dict[str, int] = {}
    for n in layer_names:
        d = runs_on(n)
        layers[d] = layers.get(d, 0) + 1
    head = runs_on(head_name)
    return {d: Share(layers.get(d, 0), d == head) for d in sorted(set(layers) | {head})}


def row_bytes_on(config, share: Share, seq_len: int, dtype_bytes: int = 2) -> int:
    """Bytes one row costs on a device: KV of its layers, activations if it runs any, logits if the head."""
    b = share.layers * kv_bytes_per_layer_token(config, dtype_bytes) * seq_len
    if share.layers or share.head:
        b += activation_bytes(config, seq_len, dtype_bytes)
    if share.head:
        b += logits_bytes(config)
    return b


def rows_on_devices(
    config, shares: Mapping[str, Share], free: Mapping[str, int], dtype_bytes: int, seq_len: int
) -> dict[str, int]:
    """Rows each execution device can hold at `seq_len` tokens: its free bytes // its bytes per row.

    A pure function: `free` is the memory each device can give to rows (after its weights); a
    device missing from `free` counts as having nothing free.
    """
    out = {}
    for d, share in shares.items():
        per_row = row_bytes_on(config, share, seq_len, dtype_bytes)
        if per_row:
            out[d] = max(0, int(free.get(d, 0))) // per_row
    return out


def rows_for_map(
    config,
    device_map: Mapping[str, object],
    layer_names: Sequence[str],
    head_name: str,
    free: Mapping[str, int],
    dtype_bytes: int,
    seq_len: int,
    cap: int,
) -> int:
    """Rows per generate call: the minimum over execution devices, at least 1, at most `cap`."""
    per_dev = rows_on_devices(config, execution_shares(device_map, layer_names, head_name), free, dtype_bytes, seq_len)
    return max(1, min([cap, *per_dev.values()]))


# ---------------------------------------------------------------------------------------------
# Live figures of a loaded model


def module_names(model, layers_path: str | None = None) -> tuple[list[str], str]:
    """(names of the decoder layers, name of the LM head) in `model.named_modules()` terms."""
    ids = {id(m): n for n, m in model.named_modules()}
    layers = [ids[id(block)] for block in get_layers(model, layers_path)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return layers, ids.get(id(head), "") if head is not None else ""


def device_map_of(model) -> dict[str, object]:
    """The model's accelerate device map, or its one device for a model loaded without one."""
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        return dict(dmap)
    return {"": next(model.parameters()).device}


def free_on(devices: Sequence[str]) -> dict[str, int]:
    """Bytes each device can give to rows now: 90% of a GPU's free memory (the allocator's cached
    blocks included); on the CPU, `runtime.cpu_budget("auto")`, i.e. the job's memory limit less
    this process's RSS (or the available RAM), not the node's RAM."""
    out = {}
    for d in devices:
        if d.startswith("cuda:"):
            i = int(d.split(":")[1])
            f, _ = torch.cuda.mem_get_info(i)
            f += torch.cuda.memory_reserved(i) - torch.cuda.memory_allocated(i)
            out[d] = int(f * HEADROOM_USE)
        elif d == "cpu":
            out[d] = cpu_budget("auto")[0]
    return out


def rows_that_fit(model, seq_len: int, cap: int, layers_path: str | None = None) -> int:
    """Rows per generate call that each device's free memory holds at this sequence length (at most `cap`)."""
    # the compute dtype (a 4-bit model's embeddings keep it): the KV cache and activations are in it
    dtype_bytes = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    dmap = device_map_of(model)
    try:
        layers, head = module_names(model, layers_path)
        shares = execution_shares(dmap, layers, head)
    except (LayerLookupError, ValueError) as e:  # layers not found: charge every device the whole model's rows
        log.info("sizing rows as if every device held every layer (%s)", e)
        devices = {device_key(d) for d in dmap.values()} - {"disk", "meta"}
        shares = {d: Share(model.config.num_hidden_layers, True) for d in devices or {"cpu"}}
    per_dev = rows_on_devices(model.config, shares, free_on(list(shares)), dtype_bytes, seq_len)
    log.info("rows that fit at %d tokens, per device: %s", seq_len, per_dev)
    return max(1, min([cap, *per_dev.values()]))


# ---------------------------------------------------------------------------------------------
# Out-of-memory back-off


def is_oom(e: BaseException) -> bool:
    """Out of memory on any device: accelerate's test (CUDA, XPU, MPS, CPU allocator, cuDNN), plus
    torch's OutOfMemoryError type and cuBLAS failing to allocate its workspace, which it misses."""
    from accelerate.utils.memory import should_reduce_batch_size

    return (
        isinstance(e, torch.cuda.OutOfMemoryError)
        or (isinstance(e, Exception) and should_reduce_batch_size(e))
        or "CUBLAS_STATUS_ALLOC_FAILED" in str(e)
    )


def _clear_cache() -> None:
    """Give the failed try's memory back: collect what its frames held, then the CUDA cache."""
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def backoff(fn: Callable[[int], T], batch_size: int, what: str) -> tuple[T, int]:
    """`fn(batch_size)`, retried with half the batch size on out-of-memory (`is_oom`), down to 1.

    The one back-off of the package: scoring and the judge call it through `with_backoff`, generation
    once per chunk of a planned batch (`generate_with_backoff`). Between tries the device cache is
    released (accelerate's `release_memory` does the same; here nothing is held to release).
    Returns (result, the batch size that worked).
    """
    size = max(1, int(batch_size))
    while True:
        try:
            return fn(size), size
        except Exception as e:  # torch.OutOfMemoryError is a RuntimeError; the CPU allocator's too
            if not is_oom(e):
                raise
            if size == 1:
                raise RuntimeError(
                    f"{what}: out of memory with 1 row per batch ({type(e).__name__}: {str(e).splitlines()[0]}); "
                    "lower generation.max_new_tokens or memory.gpu_fraction, or use a larger GPU"
                ) from e
        _clear_cache()
        log.warning("%s: out of memory with %d rows per batch; retrying with %d", what, size, max(1, size // 2))
        size = max(1, size // 2)


def with_backoff(fn: Callable[[int], T], batch_size: int, what: str) -> T:
    """`fn(batch_size)` under `backoff`: the result alone."""
    return backoff(fn, batch_size, what)[0]


def generate_with_backoff(run_batch, rows: Sequence, batch_size: int, on_done, timeout_s: float = 0.0) -> int:
    """Run `run_batch(chunk)` over `rows` in chunks of `batch_size` under `backoff`: on out-of-memory
    the chunk is halved and retried whole, and later chunks keep the smaller size.

    `on_done(chunk, outputs, seconds)` is called after every finished chunk (so results are written
    as they come). Returns the final batch size. No row is lost.
    """
    i = 0
    while i < len(rows):

        def attempt(bs: int, i: int = i):
            chunk = rows[i : i + bs]
            t0 = time.perf_counter()
            with watchdog(timeout_s, f"generate batch of {len(chunk)} rows", announce=False):
                fault_point("batch")
                return chunk, run_batch(chunk), time.perf_counter() - t0

        (chunk, outputs, seconds), batch_size = backoff(attempt, batch_size, "generation")
        on_done(chunk, outputs, seconds)
        i += len(chunk)
    return batch_size
