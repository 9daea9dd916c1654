"""Memory budget, device-map planning on the meta device, and loading the checkpoint once.

`offload_state_dict` is never passed (it makes transformers stage the whole state dict through CPU
and disk while loading, which stalls or hangs 70B loads; transformers 5 ignores it anyway). Loading
runs under a watchdog that dumps every thread's stack and exits when it stalls, so a hang is
diagnosed from the log instead of waited on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MemoryConfig, ModelConfig
from .errors import SteersweepError
from .faults import fault_point
from .hooks import contiguous_head
from .memory import device_key, module_names, placed_on
from .runtime import cpu_budget, watchdog

log = logging.getLogger(__name__)

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": None}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def auto_dtype() -> tuple[torch.dtype, str]:
    """What `dtype: auto` means on this machine, and why: the fastest dtype it computes natively.

    Decided on the machine, not assumed: CPUs with AVX512-BF16 or AMX run bfloat16 GEMMs 2-3x
    faster than float32 (measured 357-435 vs 100-189 GFLOP/s on a 2-core AVX512-BF16 Xeon), while
    CPUs without them emulate bfloat16 several times slower than float32 (16-19 vs 120-144 GFLOP/s
    on a 2-core AVX2 EPYC).
    """
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, f"{torch.cuda.get_device_name(0)} computes bfloat16 natively"
        return torch.float16, f"{torch.cuda.get_device_name(0)} has no native bfloat16 (compute capability < 8.0)"
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in cpu_flags()]
    if native:
        return torch.bfloat16, f"CPU-only; the CPU has {native[0]} (native bfloat16 matrix multiply)"
    return torch.float32, "CPU-only; the CPU has neither AVX512-BF16 nor AMX, so bfloat16 would be emulated (slower)"


def torch_dtype(name: str) -> torch.dtype:
    """Config dtype -> torch dtype; "auto" is decided on this machine (`auto_dtype`)."""
    if name == "auto":
        return auto_dtype()[0]
    return DTYPES[name]


def resolved_dtype_name(name: str) -> str:
    """The dtype a config's `model.dtype` means on this machine ("auto" resolved)."""
    return str(torch_dtype(name)).removeprefix("torch.")


def dtype_decision(name: str) -> dict:
    """The dtype record for logs and the manifest: asked, used, and why."""
    used = resolved_dtype_name(name)
    return {"config": name, "used": used, "reason": auto_dtype()[1] if name == "auto" else "set in the config"}


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


class LoadError(SteersweepError, RuntimeError):
    """The model cannot be planned or loaded as configured."""


def parse_size(text: str | int | float) -> int:
    """'80GiB' -> bytes (GiB = 2^30, GB = 10^9). Bits ('Gb') are refused rather than guessed."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or (m.group(2) and m.group(2)[-1] == "b" and m.group(2) != "b"):
        raise LoadError(f"cannot read size {text!r}: write it like 80GiB, 150GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def max_memory(mem: MemoryConfig, gpu_totals: list[int] | None = None) -> dict[int | str, int]:
    """Per-device byte budgets for `from_pretrained(max_memory=...)`.

    Each GPU gets `gpu_fraction` x its total memory; the CPU gets `runtime.cpu_budget(mem.cpu)`
    ("auto" = 90% of the RAM available now, capped by the job's memory limit). Devices left out of
    the dict are not used by accelerate, so a CPU budget of 0 removes the CPU spill (disk offload
    then needs `memory.disk_offload`).

    Args:
        gpu_totals: total bytes per GPU; default: the GPUs torch sees.
    """
    return _max_memory(mem, gpu_totals)[0]


def _max_memory(mem: MemoryConfig, gpu_totals: list[int] | None = None) -> tuple[dict[int | str, int], str]:
    """`max_memory` and the sentence saying which limit set the CPU budget (for the load log)."""
    if gpu_totals is None:
        gpu_totals = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    budget: dict[int | str, int] = {i: int(mem.gpu_fraction * t) for i, t in enumerate(gpu_totals)}
    cpu, why = cpu_budget(str(mem.cpu))
    if cpu > 0:
        budget["cpu"] = cpu
    return budget, why


def parse_hardware(spec: str) -> tuple[list[int], int | None]:
    """'8x80GiB' or '2x80GiB+256GiB' -> ([GPU bytes...], CPU bytes or None)."""
    gpus_part, _, cpu_part = spec.partition("+")
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(.+)", gpus_part)
    if not m:
        raise LoadError(f"cannot read hardware {spec!r}: write it like 8x80GiB or 2x80GiB+256GiB")
    return [parse_size(m.group(2))] * int(m.group(1)), parse_size(cpu_part) if cpu_part else None


# ---------------------------------------------------------------------------------------------
# Reading the model's config without weights


def resolve_model_path(model: ModelConfig) -> str:
    """The checkpoint to load: `model.path`, or the embedded default model (converted on demand)."""
    if model.path:
        return os.path.expanduser(model.path)
    from .embedded import DEFAULT_MODEL_DIR, prepare

    return str(prepare(DEFAULT_MODEL_DIR))


def read_model_config(model: ModelConfig, need_checkpoint: bool = True):
    """The model's transformers config, read from config.json only (no weights).

    Uses the checkpoint's own config.json when the checkpoint is reachable; otherwise the shipped
    `model.config_json` (enough for planning and validation, not for loading).
    """
    from transformers import AutoConfig

    path = model.path
    if path is None:
        from .embedded import DEFAULT_MODEL_DIR, STAMP

        if (DEFAULT_MODEL_DIR / STAMP).exists() or need_checkpoint:
            path = resolve_model_path(model)
    local = path is not None and Path(os.path.expanduser(path)).is_dir()
    if local:
        return AutoConfig.from_pretrained(os.path.expanduser(path), trust_remote_code=model.trust_remote_code)
    shipped = _shipped_config(model)
    if not need_checkpoint and shipped is not None:
        return shipped  # planning: the shipped config.json is all that is needed
    if path and _looks_like_hub_id(path):
        online, why = hub_online()
        try:  # a hub id: its config.json from the hub, or from the local hub cache when offline
            return AutoConfig.from_pretrained(
                path, revision=model.revision, trust_remote_code=model.trust_remote_code, local_files_only=not online
            )
        except OSError:
            raise LoadError(
                f"model {path!r} is neither a local folder nor reachable on the hub: "
                + ("" if online else f"{why}, and the local hub cache does not hold it; ")
                + f"download it and set model.path (or the environment variable named in conf/model/{model.name}.yaml)"
                " to the folder"
            ) from None
    raise LoadError(
        f"model path {path!r} is not a folder with a config.json: set model.path to a local checkpoint "
        f"(or the environment variable named in conf/model/{model.name}.yaml)"
    )


def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path))


@functools.cache
def hub_online(timeout_s: float = 2.0) -> tuple[bool, str]:
    """Whether the model hub can be reached, and why not: HF_HUB_OFFLINE, or one TCP connection
    attempt of `timeout_s` (without it, huggingface_hub retries for about 23 s before giving up)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return False, f"no network: {host}:{port} unreachable ({e.strerror or type(e).__name__})"
    return True, "online"


def _shipped_config(model: ModelConfig):
    from transformers import AutoConfig

    if not model.config_json:
        return None
    p = Path(model.config_json)
    if not p.is_absolute():
        p = MODEL_CONFIGS / p
    if not p.is_file():
        raise LoadError(f"shipped model config {p} not found: fix model.config_json")
    d = json.loads(p.read_text())
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


# ---------------------------------------------------------------------------------------------
# Plan


@dataclass
class Plan:
    """A device map for one hardware shape, with what it leaves per device for the rows.

    Device keys of `device_map`, `bytes_per_device` and `layers_per_device` are accelerate's ("0",
    "cpu"); `headroom` and `rows_per_device` use execution devices ("cuda:0", "cpu").
    """

    hardware: str
    device_map: dict[str, int | str]
    bytes_per_device: dict[str, int]  # weights placed on each device
    layers_per_device: dict[str, int]  # decoder layers placed on each device
    fits_on_gpus: bool  # every weight on a GPU
    quantization: str | None = None
    weight_bytes_per_param: float = 2.0  # of the quantized linear weights (else of every weight)
    seq_len: int = 0  # tokens per row the rows were sized for (prompt estimate + max_new_tokens)
    headroom: dict[str, int] = field(default_factory=dict)  # device total (or CPU budget) less its weights
    rows_per_device: dict[str, int] = field(default_factory=dict)  # rows its headroom holds at seq_len
    runs_on: str | None = None  # where layers placed on the CPU/disk run (accelerate's main device)

    @property
    def rows(self) -> int:
        """Rows per generate call this plan allows (0: not even one row fits)."""
        return min(self.rows_per_device.values(), default=0)

    def render(self) -> str:
        weights = f"{self.quantization} weights ({self.weight_bytes_per_param:g} bytes/param)" if self.quantization \
            else f"{self.weight_bytes_per_param:g} bytes/param"  # fmt: skip
        if self.fits_on_gpus:
            head = f"weights fit on the GPUs, {weights}"
        else:
            spilled = sum(n for d, n in self.layers_per_device.items() if d in ("cpu", "disk"))
            head = f"spills {spilled} layers off the GPUs ({weights}); they run on {self.runs_on}, their KV cache too"
        tight = min(self.rows_per_device, key=self.rows_per_device.get, default=None)
        if self.seq_len and tight is not None:
            head += (
                f"; up to {self.rows} rows per generate call at {self.seq_len} tokens ({tight} is the tightest)"
                if self.rows
                else f"; NO room for one row of {self.seq_len} tokens on {tight}: lower memory.gpu_fraction, "
                "generation.max_new_tokens, or use more GPUs"
            )
        lines = [f"== {self.hardware}: {head}"]
        for dev in sorted(
            self.bytes_per_device, key=lambda d: (not str(d).isdigit(), int(d) if str(d).isdigit() else 0)
        ):
            ex = device_key(dev)
            line = f"  {ex:>7}: weights {fmt_bytes(self.bytes_per_device[dev]):>11}, {self.layers_per_device.get(dev, 0):3d} decoder layers"
            if ex in self.headroom:
                line += f"; headroom {fmt_bytes(self.headroom[ex]):>11}"
            if ex in self.rows_per_device:
                line += f" -> {self.rows_per_device[ex]} rows"
            elif dev in ("cpu", "disk") and self.runs_on:
                line += f" (these layers run on {self.runs_on})"
            lines.append(line)
        return "\n".join(lines)


def empty_model(config, trust_remote_code: bool = False):
    """Build the model on the meta device: shapes and module classes, no memory, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


# bitsandbytes: bytes per quantized linear weight, and the dtype accelerate sizes it with
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5}


def quantized_params(model) -> list[str]:
    """Parameters bitsandbytes quantizes: the weights of linear layers, except the ones transformers
    keeps in the compute dtype (the LM head, tied and last modules: `get_keys_to_not_convert`)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = get_keys_to_not_convert(model)
    return [
        f"{name}.weight"
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not any(name == k or name.startswith(k + ".") for k in keep)
    ]


def quantization_config(model_cfg: ModelConfig, dtype: torch.dtype, may_spill: bool):
    """transformers' BitsAndBytesConfig for `model.quantization` (None when unset).

    4bit is NF4 with the run's dtype as compute dtype. When the budget lets weights spill off the
    GPUs, `llm_int8_enable_fp32_cpu_offload` keeps the spilled modules unquantized (bitsandbytes
    cannot run them on the CPU; without the flag transformers refuses such a map).
    """
    if not model_cfg.quantization:
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoadError(
            f"model.quantization={model_cfg.quantization} needs bitsandbytes: pip install -e '.[quant]' "
            "(or set model.quantization=null)"
        )
    if not torch.cuda.is_available():
        raise LoadError(f"model.quantization={model_cfg.quantization} needs a CUDA GPU: set model.quantization=null")
    from transformers import BitsAndBytesConfig

    q: dict = (
        {"load_in_8bit": True}
        if model_cfg.quantization == "8bit"
        else {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
    )
    return BitsAndBytesConfig(**q, llm_int8_enable_fp32_cpu_offload=may_spill)


def plan_device_map(
    config,
    budget: dict[int | str, int],
    dtype: torch.dtype,
    hardware: str = "",
    strategy: str = "auto",
    trust_remote_code: bool = False,
    quantization: str | None = None,
    seq_len: int = 0,
    totals: dict[int | str, int] | None = None,
) -> Plan:
    """Device map the budget gives for this model, computed on an empty (meta) model, and the
    rows of `seq_len` tokens each device's headroom holds.

    Args:
        budget: per-device weight budget (`max_memory`).
        quantization: 8bit | 4bit: linear weights sized at 1 or 0.5 bytes, the budget cut to 90%
            as transformers' bitsandbytes quantizers do; modules spilled to the CPU stay unquantized.
        seq_len: tokens per row (prompt + new tokens); 0 skips the rows.
        totals: each device's whole memory (GPUs: the card; "cpu": its budget); default `budget`.
            Headroom = total - weights placed there (on the main device, also less the largest
            spilled module, which is copied in for its forward).
    """
    from accelerate.utils import CustomDtype, compute_module_sizes, get_balanced_memory, infer_auto_device_map

    from .memory import HEADROOM_USE, execution_shares, rows_on_devices

    model = empty_model(config, trust_remote_code)
    # Planning for GPUs this machine lacks is the point here: silence "Device N is not available".
    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    totals = dict(totals or budget)
    budget = dict(budget)
    special: dict[str, object] | None = None
    per_param = float(torch.finfo(dtype).bits // 8)
    if quantization:
        per_param = QUANT_BYTES[quantization]
        qdtype = torch.int8 if quantization == "8bit" else CustomDtype.INT4
        special = dict.fromkeys(quantized_params(model), qdtype)
        budget = {k: int(v * 0.9) for k, v in budget.items()}  # the quantizers' adjust_max_memory
    if strategy in ("auto", "balanced", "balanced_low_0") and sum(isinstance(k, int) for k in budget) > 1:
        budget = get_balanced_memory(
            model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype, special_dtypes=special,
            low_zero=strategy == "balanced_low_0",
        )  # fmt: skip
    dmap = infer_auto_device_map(
        model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype, special_dtypes=special
    )
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
    full = compute_module_sizes(model, dtype=dtype) if special else sizes  # spilled modules stay unquantized
    layer_names, head_name = module_names(model)
    per_dev: Counter = Counter()
    layers: Counter = Counter()
    for name, dev in dmap.items():
        per_dev[str(dev)] += (full if dev in ("cpu", "disk") else sizes)[name]
    for n in layer_names:
        layers[str(placed_on(dmap, n))] += 1
    fits = all(isinstance(d, int) or str(d).isdigit() for d in dmap.values())
    shares = execution_shares(dmap, layer_names, head_name)
    spilled = [full[n] for n, d in dmap.items() if d in ("cpu", "disk")]
    gpus = [device_key(d) for d in dmap.values() if device_key(d).startswith("cuda:")]
    runs_on = min(gpus, key=lambda d: int(d[5:])) if gpus and spilled else None
    headroom = {}
    for dev, total in totals.items():
        if dev == "disk":
            continue
        h = int(total) - per_dev.get(str(dev), 0)
        if device_key(dev) == runs_on:
            h -= max(spilled)
        headroom[device_key(dev)] = h
    rows = {}
    if seq_len:
        free = {d: int(max(0, h) * HEADROOM_USE) for d, h in headroom.items()}
        rows = rows_on_devices(config, shares, free, int(torch.finfo(dtype).bits // 8), seq_len)
    return Plan(
        hardware,
        dict(dmap),
        dict(per_dev),
        dict(layers),
        fits,
        quantization,
        per_param,
        seq_len,
        headroom,
        rows,
        runs_on,
    )


# ---------------------------------------------------------------------------------------------
# Load


# Keys of a generation config that name tokens, not decoding choices: kept from the checkpoint.
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def neutral_generation_config(model) -> dict:
    """Replace the checkpoint's generation defaults with neutral ones; return what it shipped.

    Checkpoints ship decoding defaults (Qwen2.5: repetition_penalty 1.05, temperature, top_p,
    top_k): left in place, `generate` applies them to "greedy" runs too. Only the special-token ids
    are kept; every sampling, penalty and length setting of a run is then exactly what
    generation.py passes (max_new_tokens, and the per-row sampler when sampling).
    """
    from transformers import GenerationConfig

    old = model.generation_config
    shipped = old.to_diff_dict()
    model.generation_config = GenerationConfig(
        **{k: getattr(old, k) for k in TOKEN_KEYS if getattr(old, k, None) is not None}
    )
    changed = {
        k: v
        for k, v in shipped.items()
        if k not in TOKEN_KEYS and not k.startswith("_") and k != "transformers_version"
    }
    if changed:
        log.info("ignoring the checkpoint's generation defaults %s: decoding is set by conf/generation", changed)
    return shipped


def load_model(model_cfg: ModelConfig, mem: MemoryConfig, gpu: int | None = None):
    """Load tokenizer and model once: device_map + max_memory, never offload_state_dict.

    Args:
        gpu: data-parallel replica: use only this GPU (its budget), no other device.

    Returns:
        (model, tokenizer, info) where info records the budget, device map and per-device layers.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_cfg)
    budget, cpu_why = _max_memory(mem)
    if gpu is not None:
        budget = {gpu: budget[gpu]}
    else:  # a replica pinned to one GPU never spills to the CPU, so the CPU limit only matters here
        log.info("CPU budget: %s (%s)", fmt_bytes(budget.get("cpu", 0)), cpu_why)
    kwargs: dict = {
        "device_map": model_cfg.device_map,
        "max_memory": budget,
        "dtype": torch_dtype(model_cfg.dtype),
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if mem.disk_offload:
        kwargs["offload_folder"] = mem.offload_folder
    if model_cfg.quantization:  # the int8 CPU-offload flag whenever the budget lets weights leave the GPUs
        may_spill = "cpu" in budget or mem.disk_offload
        kwargs["quantization_config"] = quantization_config(model_cfg, kwargs["dtype"], may_spill)
    if not Path(path).is_dir() and _looks_like_hub_id(path) and not hub_online()[0]:
        kwargs["local_files_only"] = True  # offline: the hub cache only, no ~23 s of retries
    dtype = dtype_decision(model_cfg.dtype)
    log.info("dtype %s -> %s (%s)", dtype["config"], dtype["used"], dtype["reason"])
    log.info("memory budget: %s", {k: fmt_bytes(v) for k, v in budget.items()})
    t0 = time.perf_counter()
    with watchdog(mem.load_timeout_s, f"loading {path}"):
        fault_point("load")
        tokenizer = AutoTokenizer.from_pretrained(
            path,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            local_files_only=kwargs.get("local_files_only", False),
        )
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    model.requires_grad_(False)
    contiguous_head(model)  # frozen weights + a strided last-token slice: see hooks.contiguous_head
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    shipped = neutral_generation_config(model)
    dmap = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    # placement from the map: a layer offloaded to the CPU or disk holds meta tensors, not its device
    per_dev = Counter(device_key(placed_on(dmap, n)) for n in module_names(model, model_cfg.layers_path)[0])
    info = {
        "path": path,
        "dtype": dtype,
        "load_seconds": round(time.perf_counter() - t0, 2),
        "max_memory": {str(k): v for k, v in budget.items()},
        "device_map": {k: str(v) for k, v in dmap.items()},
        "layers_per_device": dict(per_dev),
        # what the checkpoint's generation_config.json asked for, and what generation really uses
        "generation_config_shipped": shipped,
        "generation_config_effective": model.generation_config.to_diff_dict(),
        "gpu_allocated": {f"cuda:{i}": torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())},
    }
    log.info(
        "loaded %s in %.1f s; decoder layers per device: %s",
        path,
        info["load_seconds"],
        dict(per_dev),
    )
    for dev, n in info["gpu_allocated"].items():
        log.info("%s allocated after load: %s", dev, fmt_bytes(n))
    return model, tokenizer, info
