"""A run's identity: the config keys and input file digests that decide its rows, their hash (the
run folder's name), and the refusal when a folder holds another run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from steersweep.core import errors
from steersweep.core.errors import PlanError
from steersweep.inputs import datasets
from steersweep.runs.grid import as_list, concepts

# Keys under each identity group that never change a row (batching, placement, notes for humans).
NOT_IDENTITY = {
    "model": ("config_json", "device_map", "num_hidden_layers", "recommended_layers", "recommended_alphas"),
    "vectors": ("batch_size", "save"),
    "generation": ("batch_size", "max_batch_size"),
}
IDENTITY_GROUPS = ("model", "vectors", "generation", "steering", "prompts", "eval")


# ---------------------------------------------------------------------------------------------
# Identity


def identity(cfg: DictConfig) -> dict:
    """The row-defining config: every key that changes what a row means, with `auto` resolved."""
    from steersweep.model.dtypes import resolved_dtype_name

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
    named = {"prompts": cfg.prompts.dataset, "word_lists": cfg.eval.word_lists}
    for i, (_, source) in enumerate(concepts(cfg.vectors)):  # the first keeps the key it had before concept lists
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
                path = datasets.resolve(str(name), suffix)
                break
            except errors.DatasetError:
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
# Run folders and the claim


def folder_for(cfg: DictConfig, ident_hash: str) -> Path:
    """`run_dir` as given, else `<results_root>/<run_name or model-concept>-<identity hash>`:
    readable, and two configs never share a default folder. A relative `results_root` is under the
    working directory (`./results` where the command runs), as Hydra's sweep folder is."""
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser()
    name = cfg.run_name or f"{cfg.model.name}-{'+'.join(c for c, _ in concepts(cfg.vectors))}"
    root = Path(cfg.results_root).expanduser()
    return root.absolute() / f"{name}-{ident_hash}"


def check_identity(doc: dict, ident: dict, ident_hash: str, folder: Path) -> None:
    """Refuse (PlanError, one line naming the differing keys) a plan claimed by another identity."""
    diff = differing_keys(doc["identity"], json.loads(json.dumps(ident, default=str)))
    if diff or doc["identity_hash"] != ident_hash:
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise PlanError(
            f"run folder {folder} holds the plan of another config (differs in {shown or 'version'}): "
            "drop run_dir/run_name to get a folder of its own, or restore those settings"
        )
