"""The plan: what a run folder holds and which worker makes which row, fixed before any weight is read.

- **Identity**: the config keys that define what a row means (model, vectors, decoding, the grid,
  prompts, metrics), with a short hash. The hash names the default folder and is part of every
  cell id, so rows of two configs can never be mistaken for each other.
- **Cells** (prompt x concept x method x mode x layer set x alpha x sample) in one canonical order, cut into **batches** of a
  fixed size. The batch a row is made in is part of the plan, so rows are a function of
  (cell, plan), whatever order workers start, die or come back in.
- **Dealing**: batch b belongs to worker `b % n_workers` over the *full* plan; only then are
  finished batches dropped. A shard that starts late, is throttled, cancelled, requeued or run
  twice therefore finds exactly its own batches still to do, and a run with one worker takes all.
- **Claim**: the identity and the batch list are written into the folder atomically (`plan.json`)
  before the model loads; a job whose identity differs is refused at once, naming the keys.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import SteersweepError
from .fileio import claim
from .paths import source_checkout

PLAN_FILE = "plan.json"
PLAN_FORMAT = "steersweep.plan.v2"  # v2: batches listed (a baseline is one decode)
DEFAULT_BATCH = 64  # rows per planned batch when generation.batch_size=0

# Keys under each identity group that never change a row (batching, placement, notes for humans).
NOT_IDENTITY = {
    "model": ("config_json", "device_map", "num_hidden_layers", "recommended_layers", "recommended_alphas"),
    "vectors": ("batch_size", "save"),
    "generation": ("batch_size", "max_batch_size"),
}
IDENTITY_GROUPS = ("model", "vectors", "generation", "steering", "prompts", "eval")


class PlanError(SteersweepError, ValueError):
    """The run folder's plan conflicts with this job (another identity, another version)."""


@dataclass(frozen=True)
class Cell:
    cell_id: str
    layer: int  # the first (lowest) layer of the cell's layer set
    alpha: float
    prompt_id: str
    prompt: str
    sample: int
    seed: int
    layers: tuple[int, ...] = ()  # every layer the cell steers (each with its own vector); () = (layer,)
    layer_set: str = ""  # its label: "10", "10+14" or "all"; "" = str(layer)
    concept: str = ""  # the concept of its vectors (vectors.concept)
    method: str = "mean_diff"  # extraction method of its vectors (vectors.method)
    mode: str = "add"  # injection mode (steering.mode)

    @property
    def steered_layers(self) -> tuple[int, ...]:
        return self.layers or (self.layer,)

    @property
    def label(self) -> str:
        return self.layer_set or str(self.layer)

    @property
    def decode_key(self) -> tuple:
        """Cells with one key are one decode. Alpha 0 is the unsteered model whatever the concept,
        layer set, method or mode: every alpha-0 cell of a prompt and sample shares one baseline
        decode (and one seed), so the baseline is the same row for every layer, in every dtype."""
        return ("baseline", self.prompt_id, self.sample) if self.alpha == 0 else (self.cell_id,)

    @property
    def setting(self) -> tuple[str, str, float, str, str]:
        """What a per-setting metric (behavior_prob, next_token_kl) is a function of: the cell
        minus its prompt and sample (see `RunFolder.setting_done`)."""
        return (self.concept, self.label, float(self.alpha), self.method, self.mode)


@dataclass(frozen=True)
class Batch:
    index: int
    cells: tuple[Cell, ...]

    @property
    def batch_id(self) -> str:
        return f"b{self.index:05d}"


# ---------------------------------------------------------------------------------------------
# Identity


def identity(cfg: DictConfig) -> dict:
    """The row-defining config: every key that changes what a row means, with `auto` resolved."""
    from .loading import resolved_dtype_name

    out = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in IDENTITY_GROUPS}
    for group, keys in NOT_IDENTITY.items():
        for k in keys:
            out[group].pop(k, None)
    out["model"]["dtype"] = resolved_dtype_name(cfg.model.dtype)  # auto means different rows per machine
    if not out["eval"].get("behavior_sets"):  # added later: a run without extra item sets keeps its identity
        out["eval"].pop("behavior_sets", None)
    out["input_files"] = input_digests(cfg)
    return out


def input_digests(cfg: DictConfig) -> dict[str, str | None]:
    """Content hashes of the files rows are made from: an edited prompt or pair file is another
    identity, so a resume never mixes rows made from the old text with rows from the new."""
    from . import data

    named = {"prompts": cfg.prompts.dataset, "word_lists": cfg.eval.word_lists}
    for i, (_, source) in enumerate(concepts(cfg)):  # the first keeps the key it had before concept lists
        named[("vectors" if cfg.vectors.source == "file" else "pairs") + (f".{i}" if i else "")] = source
    if "behavior_prob" in cfg.eval.metrics:
        for i, name in enumerate(as_list(cfg.eval.behavior_dataset)):
            named["behavior_items" + (f".{i}" if i else "")] = name
        for name in cfg.eval.get("behavior_sets") or []:
            named[f"behavior_set.{name}"] = name
    out: dict[str, str | None] = {}
    for key, name in named.items():
        path = None
        for suffix in (".jsonl", ".json", ""):
            try:
                path = data.resolve(str(name), suffix)
                break
            except data.DatasetError:
                continue
        # a missing file is reported by validation with its own message; here it has no digest
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path and path.is_file() else None
    return out


def identity_hash(ident: dict) -> str:
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]


def differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted leaf keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(k), new.get(k), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, name + ".")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# Cells and batches


def cell_key(ident_hash: str, layer: int, alpha: float, prompt_id: str, sample: int, extra: str = "") -> str:
    return hashlib.sha1(f"{ident_hash}|{layer}|{alpha!r}|{prompt_id}|{sample}{extra}".encode()).hexdigest()[:16]


def cell_seed(base_seed: int, concept: str, layer: int | str, alpha: float, prompt_id: str, sample: int) -> int:
    """Sampling seed of a cell: its coordinates only, so a cell samples alike in any grid or folder.
    Methods and modes share seeds (paired comparisons: the same noise under another steering)."""
    h = int(hashlib.sha1(f"{concept}|{layer}|{alpha!r}|{prompt_id}|{sample}".encode()).hexdigest()[:16], 16)
    return (base_seed * 1_000_003 + h) % 2**31


def as_list(value) -> list:
    """A config value that may be one item or a list of items (steering.mode, vectors.method)."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def concepts(cfg: DictConfig) -> list[tuple[str, str | None]]:
    """[(concept, its pairs dataset or its vector file)]: `vectors.concept` may be a list, taken
    place by place with `vectors.dataset` (source=compute) or `vectors.path` (source=file)."""
    vec = cfg.vectors
    names = [str(c) for c in as_list(vec.get("concept", "concept"))]
    source = vec.get("path") if vec.get("source", "compute") == "file" else vec.get("dataset")
    sources = as_list(source) if source is not None else [None]
    if len(sources) != len(names):
        raise ValueError(
            f"vectors.concept lists {len(names)} concept(s) but vectors.{'path' if vec.get('source') == 'file' else 'dataset'}"
            f" gives {len(sources)}: give one per concept, in the same order"
        )
    return [(n, None if x is None else str(x)) for n, x in zip(names, sources, strict=True)]


def set_label(item) -> str:
    """The label of one `steering.layers` item: "10", "10+14" (its layers sorted) or "all"."""
    if isinstance(item, (str, int)):
        return str(item)
    return "+".join(str(x) for x in sorted(int(x) for x in item))


def layer_sets(spec, num_layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """`steering.layers` -> [(label, layers)]: an int is one layer, a list is one cell steering every
    layer in it ("10+14"), "all" every decoder layer (needs `num_layers`, from the model's config)."""
    out = []
    for item in as_list(spec):
        if isinstance(item, str):
            if item != "all":
                raise ValueError(f"steering.layers item {item!r}: use a layer number, a list of them, or all")
            if num_layers is None:
                raise ValueError("steering.layers=all needs the model's number of layers")
            out.append(("all", tuple(range(num_layers))))
        elif isinstance(item, int):
            out.append((set_label(item), (int(item),)))
        else:
            out.append((set_label(item), tuple(sorted(int(x) for x in item))))
    return out


def grid_origin(cfg: DictConfig) -> str:
    """Where the grid's layers and alphas come from, in words: the model preset's defaults
    (`model.recommended_layers` / `recommended_alphas`, what `steering.*` interpolates unless set) or
    the command. `task=plan` and the run log print it, so a sweep never runs on a grid nobody chose."""
    said = []
    for key, preset in (("layers", "recommended_layers"), ("alphas", "recommended_alphas")):
        values = ", ".join(set_label(x) if key == "layers" else f"{float(x):g}" for x in cfg.steering[key])
        default = OmegaConf.is_interpolation(cfg.steering, key)
        why = f"model {cfg.model.name}'s {preset}; set steering.{key} to choose" if default else f"steering.{key}"
        said.append(f"{key} [{values}] ({why})")
    return "; ".join(said)


def all_layers(cfg: DictConfig, num_layers: int | None = None) -> list[int]:
    """Every layer some cell steers: the layers vectors are needed for."""
    return sorted({layer for _, ls in layer_sets(cfg.steering.layers, num_layers) for layer in ls})


def expand(cfg: DictConfig, prompts: list[dict], ident_hash: str, num_layers: int | None = None) -> list[Cell]:
    """prompts x concepts x methods x modes x layer sets x alphas x samples, in the canonical order.

    Prompt-major: a batch then holds few distinct prompts (little padding; shared prefills are
    computed once per prompt). Each prompt starts with its baseline: the alpha-0 cells of every
    concept, method, mode and layer set, side by side (one decode, see `Cell.decode_key`, kept in one
    batch by `cut`), then its steered cells. A grid of single layers, one method and one mode keeps
    the cell ids it had before those axes existed.
    """
    sets = layer_sets(cfg.steering.layers, num_layers)
    alphas = [float(x) for x in cfg.steering.alphas]
    methods = [str(m) for m in as_list(cfg.vectors.get("method", "mean_diff"))]  # schema defaults: partial
    modes = [str(m) for m in as_list(cfg.steering.get("mode", "add"))]  # configs (tests, API) plan alike
    names = [c for c, _ in concepts(cfg)]
    plain = len(methods) == 1 and len(modes) == 1 and all(len(ls) == 1 and lb != "all" for lb, ls in sets)
    many = len(names) > 1

    def cell(p: dict, concept: str, method: str, mode: str, label: str, layers: tuple, alpha: float, s: int) -> Cell:
        extra = ("" if plain else f"|{label}|{method}|{mode}") + (f"|{concept}" if many else "")
        cid = cell_key(ident_hash, layers[0], alpha, p["id"], s, extra)
        # the baseline's seed is the prompt's and sample's alone: one unsteered decode for all
        seed = cell_seed(cfg.generation.seed, *((concept, label) if alpha else ("", "baseline")), alpha, p["id"], s)
        return Cell(cid, layers[0], alpha, p["id"], p["prompt"], s, seed, layers, label, concept, method, mode)

    variants = [(c, m, mode, lb, ls) for c in names for m in methods for mode in modes for lb, ls in sets]
    cells = []
    for p in prompts:
        if 0.0 in alphas:
            cells += [cell(p, *v, 0.0, s) for s in range(cfg.steering.samples) for v in variants]
        cells += [cell(p, *v, a, s) for v in variants for a in alphas if a != 0 for s in range(cfg.steering.samples)]
    return cells


def planned_batch_size(cfg: DictConfig) -> int:
    return int(cfg.generation.batch_size) or DEFAULT_BATCH


def cut(cells: list[Cell], size: int) -> list[Batch]:
    """Batches of `size` decodes each, in order: cells sharing a decode (`Cell.decode_key`: a
    prompt's baseline) count once and are never split between batches."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.decode_key, []).append(c)
    units = list(groups.values())
    return [
        Batch(i, tuple(c for u in units[s : s + size] for c in u)) for i, s in enumerate(range(0, len(units), size))
    ]


def batch_cells(doc: dict) -> list[list[str]]:
    """The cell ids of each planned batch, as a claimed plan.json fixes them."""
    order = [row[0] for row in doc["cells"]]
    bounds = [0, *itertools.accumulate(doc["batch_cells"])]
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


def deal(batches: list[Batch], worker: int, n_workers: int) -> list[Batch]:
    """The batches of one worker: a fixed function of the batch over the full plan."""
    return [b for b in batches if b.index % n_workers == worker]


def todo(batches: list[Batch], done: set[str], worker: int, n_workers: int) -> list[Batch]:
    """What a worker still has to do: its dealt batches minus those whose cells are all present.

    Dealing happens first, over the full plan; finished work is dropped only afterwards, so the
    share of a worker never depends on what other workers have finished.
    """
    return [b for b in deal(batches, worker, n_workers) if not all(c.cell_id in done for c in b.cells)]


# ---------------------------------------------------------------------------------------------
# Shards


def shard_of(cfg: DictConfig, multirun: bool | None = None) -> tuple[int, int]:
    """This job's (index, count) of shards. Sharding is explicit: nothing is read from the
    environment unless `shard_count=auto`, which takes the Slurm array task (the sbatch script's
    choice). A job started by a Hydra multirun (one Slurm array for all its jobs) never shards.
    """
    from .validate import ConfigError

    if cfg.shard_count is None:
        return 0, 1
    if str(cfg.shard_count) != "auto":
        return int(cfg.shard_index or 0), int(cfg.shard_count)
    if multirun if multirun is not None else _in_multirun():
        raise ConfigError(
            "shard_count=auto in a -m sweep would split every job's grid across the sweep's array: "
            "drop it, or sweep shards explicitly (-m shard_count=2 shard_index=0,1)"
        )
    raw = {k: os.environ.get(k) for k in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN")}
    if raw["SLURM_ARRAY_TASK_COUNT"] is None:
        return 0, 1  # not an array job: one shard
    try:
        n, i = int(raw["SLURM_ARRAY_TASK_COUNT"] or ""), int(raw["SLURM_ARRAY_TASK_ID"] or "")
        first = int(raw["SLURM_ARRAY_TASK_MIN"] or 0)
    except ValueError:
        shown = " ".join(f"{k}={v}" for k, v in raw.items() if v is not None)
        raise ConfigError(
            f"Slurm array environment is not integers ({shown}): unset it or set shard_index and shard_count"
        ) from None
    if not (n >= 1 and 0 <= i - first < n):
        raise ConfigError(
            f"Slurm array task {i} (min {first}) is not in a contiguous array of {n} tasks: "
            f"submit --array=0-{max(n, 1) - 1}, or set shard_index and shard_count"
        )
    return i - first, n


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def worker_name(shard: tuple[int, int], rank: int = 0, world: int = 1) -> str:
    return f"s{shard[0]}of{shard[1]}" + (f"r{rank}" if world > 1 else "")


# ---------------------------------------------------------------------------------------------
# Run folders and the claim


def folder_for(cfg: DictConfig, ident_hash: str) -> Path:
    """`run_dir` as given, else `<results_root>/<run_name or model-concept>-<identity hash>`:
    readable, and two configs never share a default folder. A relative `results_root` is under the
    working directory (`./results` where the command runs), as Hydra's sweep folder is."""
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser()
    name = cfg.run_name or f"{cfg.model.name}-{'+'.join(c for c, _ in concepts(cfg))}"
    root = Path(cfg.results_root).expanduser()
    return root.absolute() / f"{name}-{ident_hash}"


def launch_command() -> list[str]:
    """The overrides of the running Hydra job (for `task=status` to say how to finish)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def run_dir_arg(folder: Path) -> str:
    """`run_dir=<folder>` as one shell word: Hydra's quoting for odd characters, then the shell's."""
    path = str(folder)
    if not re.fullmatch(r"[\w./-]+", path):  # Hydra's grammar: quote, then the shell's quoting on top
        path = '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return shlex.quote(f"run_dir={path}")


def cli_command() -> str:
    """The command to suggest: `python run_experiment.py` from a source checkout (its documented
    entry, run from the checkout's root), else `steersweep` (the console script an install gives)."""
    return "python run_experiment.py" if source_checkout() is not None else "steersweep"


def finish_command(command: list[str], folder: Path) -> str:
    keep = [a for a in command if a.split("=")[0].lstrip("+~") not in ("shard_index", "shard_count", "run_dir", "task")]
    return " ".join([cli_command(), *map(shlex.quote, keep), run_dir_arg(folder)])


@dataclass
class RunPlan:
    """The claimed plan of a run folder."""

    folder: Path
    identity: dict
    identity_hash: str
    batch_size: int
    batches: list[Batch]
    command: list[str]

    @property
    def cells(self) -> list[Cell]:
        return [c for b in self.batches for c in b.cells]


def _plan_doc(ident: dict, ident_hash: str, size: int, cells: list[Cell], command: list[str]) -> dict:
    batches = cut(cells, size)
    return {
        "format": PLAN_FORMAT,
        "identity_hash": ident_hash,
        "identity": ident,
        "batch_size": size,  # decodes per batch: a prompt's alpha-0 cells are one decode
        "n_cells": len(cells),
        "n_batches": len(batches),
        "batch_cells": [len(b.cells) for b in batches],  # batch b = the next batch_cells[b] cells in order
        "cells": [  # in batch order (the canonical order, a baseline's cells side by side)
            [c.cell_id, c.layer, c.alpha, c.prompt_id, c.sample, c.label, c.method, c.mode, c.concept]
            for b in batches
            for c in b.cells
        ],
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_plan_doc(folder: Path) -> dict | None:
    p = Path(folder) / PLAN_FILE
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{p} is unreadable ({e}): move the folder aside or choose another run_dir") from None
    if doc.get("format") == "steersweep.plan.v1":
        raise PlanError(
            f"{p} is an older plan (each layer decoded its own alpha-0 baseline; sampled baselines were "
            "seeded per layer): its rows would not match this version's, so choose another run_dir"
        )
    if doc.get("format") != PLAN_FORMAT:
        raise PlanError(f"{p} was written by another steersweep version: choose another run_dir")
    return doc


def check_identity(doc: dict, ident: dict, ident_hash: str, folder: Path) -> None:
    """Refuse (PlanError, one line naming the differing keys) a plan claimed by another identity."""
    diff = differing_keys(doc["identity"], json.loads(json.dumps(ident, default=str)))
    if diff or doc["identity_hash"] != ident_hash:
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise PlanError(
            f"run folder {folder} holds the plan of another config (differs in {shown or 'version'}): "
            "drop run_dir/run_name to get a folder of its own, or restore those settings"
        )


def claim_plan(cfg: DictConfig, folder: Path, cells: list[Cell], ident: dict, ident_hash: str) -> RunPlan:
    """Claim the folder for this identity and plan, or join the plan already claimed there.

    The first job writes plan.json atomically (exclusive create); every later job (a resume, a
    requeue, another shard, a concurrent twin) must have the same identity, and then uses the
    folder's batch size and order whatever its own `generation.batch_size` says, so work is never
    re-dealt. Raises PlanError naming the differing keys otherwise.
    """
    folder = Path(folder)
    size = planned_batch_size(cfg)
    doc = read_plan_doc(folder)
    if doc is None:
        if (folder / "manifest.json").exists():
            raise PlanError(
                f"run folder {folder} was made by an older steersweep (no {PLAN_FILE}): choose another run_dir"
            )
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_plan_doc(ident, ident_hash, size, cells, launch_command()), indent=1, default=str)
        if not claim(folder / PLAN_FILE, text):  # a concurrent job claimed it first: join or refuse
            doc = read_plan_doc(folder)
    if doc is None:
        doc = json.loads((folder / PLAN_FILE).read_text())
    check_identity(doc, ident, ident_hash, folder)
    by_id = {c.cell_id: c for c in cells}
    order = [row[0] for row in doc["cells"]]
    if set(order) != set(by_id) or len(order) != len(by_id):
        raise PlanError(f"{folder / PLAN_FILE} lists other cells than this config makes: choose another run_dir")
    size = int(doc["batch_size"])
    if planned_batch_size(cfg) != size and cfg.generation.batch_size:
        import logging

        logging.getLogger(__name__).info(
            "using the folder's planned batch size %d (this command asked for %d): work is never re-dealt",
            size, cfg.generation.batch_size,
        )  # fmt: skip
    batches = [Batch(b, tuple(by_id[i] for i in ids)) for b, ids in enumerate(batch_cells(doc))]
    return RunPlan(folder, ident, ident_hash, size, batches, list(doc.get("command") or []))
