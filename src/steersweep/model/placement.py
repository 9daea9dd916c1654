"""Where the weights go: the memory budget per device (`max_memory`), quantisation, and the device
map planned on an empty model before any weight is read (`plan_device_map`, `Placement`)."""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from steersweep.core.config import MemoryConfig, ModelConfig
from steersweep.core.errors import LoadError
from steersweep.core.runtime import cpu_budget
from steersweep.core.units import fmt_bytes, parse_size
from steersweep.model.memory import HEADROOM_USE, device_key, execution_shares, module_names, placed_on, rows_on_devices


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
# Placement


@dataclass
class Placement:
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
        elif not any(str(d).isdigit() for d in self.bytes_per_device):  # nothing on a GPU
            head = f"no GPU: every layer is placed and runs on the CPU{' or disk' if 'disk' in self.bytes_per_device else ''}, {weights}"
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
) -> Placement:
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
    return Placement(
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
