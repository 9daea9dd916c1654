"""`VectorSet` and its files: safetensors written with metadata, and read back from ours,
repeng/llama.cpp control vectors (GGUF) and TransformerLens-style .pt files (weights_only)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steersweep.core.errors import VectorError
from steersweep.core.fileio import atomic_write_bytes


@dataclass
class VectorSet:
    """One concept's steering vectors, one per layer."""

    vectors: dict[int, torch.Tensor]  # layer -> float32 [hidden]
    concept: str = "concept"
    meta: dict[str, str] = field(default_factory=dict)  # model, position, n_pairs, source...
    resid_norms: dict[int, float] = field(default_factory=dict)  # mean |h| at each layer

    @property
    def method(self) -> str:
        """How the vectors were found (`METHODS`), as recorded in their metadata; "file" if unknown."""
        m = self.meta.get("method", "file")
        return "mean_diff" if m == "caa_mean_difference" else m  # the name before methods existed

    def norm(self, layer: int) -> float:
        return float(self.vectors[layer].norm())

    def sha256(self, layer: int) -> str:
        return hashlib.sha256(self.vectors[layer].float().contiguous().numpy().tobytes()).hexdigest()

    def vector_id(self, layer: int) -> str:
        """Stable id: concept, layer and the first 12 hex digits of the tensor's hash."""
        return f"{self.concept}-L{layer}-{self.sha256(layer)[:12]}"

    def set_id(self, layers: Sequence[int], label: str) -> str:
        """Id of the vectors a cell steering several layers uses: `vector_id` for one layer, else the
        concept, the set's label and 12 hex digits of the hash of its layers' hashes."""
        if len(layers) == 1:
            return self.vector_id(layers[0])
        digest = hashlib.sha256("|".join(f"{k}:{self.sha256(k)}" for k in layers).encode()).hexdigest()
        return f"{self.concept}-L{label}-{digest[:12]}"

    def validate(self, hidden_size: int, num_layers: int, layers: Sequence[int] = ()) -> None:
        """Refuse wrong widths, NaN/Inf, out-of-range layers and missing requested layers."""
        for layer, v in self.vectors.items():
            if not 0 <= layer < num_layers:
                raise VectorError(
                    f"vector for layer {layer} but the model has {num_layers} layers (0..{num_layers - 1})"
                )
            if v.ndim != 1 or v.numel() != hidden_size:
                raise VectorError(
                    f"vector for layer {layer} has shape {tuple(v.shape)} but the model's hidden size "
                    f"is {hidden_size}: use vectors computed for this model"
                )
            if not torch.isfinite(v).all():
                raise VectorError(f"vector for layer {layer} contains NaN or Inf: recompute or fix the file")
        missing = sorted(set(layers) - set(self.vectors))
        if missing:
            raise VectorError(
                f"no vector for layer(s) {missing}; the file has layers {sorted(self.vectors)}: "
                "change steering.layers or use vectors.source=compute"
            )

    def normalized(self) -> VectorSet:
        vecs = {layer: v / v.norm().clamp_min(1e-12) for layer, v in self.vectors.items()}
        return VectorSet(
            vecs,
            self.concept,
            {**self.meta, "normalized": "true"},
            dict(self.resid_norms),
        )


# ---------------------------------------------------------------------------------------------
# Save / load


def save(vs: VectorSet, path: str | Path) -> Path:
    """Write a VectorSet as safetensors (`layer.{L}` tensors; metadata as JSON strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(vs.meta)
    meta["concept"] = vs.concept
    meta["format"] = "steersweep.vectors.v1"
    meta["norms"] = json.dumps({str(k): vs.norm(k) for k in vs.vectors})
    meta["resid_norms"] = json.dumps({str(k): v for k, v in vs.resid_norms.items()})
    tensors = {f"layer.{k}": v.float().contiguous() for k, v in vs.vectors.items()}
    # unique tmp name: array tasks starting together may save the same file at once
    atomic_write_bytes(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


GGUF_ARCH = "controlvector"  # llama.cpp control vectors (see vectors/exchange.py)


def read_control_vector(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a control-vector GGUF: ({"direction.k": tensor}, metadata)."""
    import numpy as np
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except Exception as e:
        raise VectorError(f"cannot read GGUF file {path}: {e}") from None
    meta: dict[str, str] = {}
    for name, fld in r.fields.items():
        if name.startswith((GGUF_ARCH + ".", "steersweep.")) or name == "general.architecture":
            value = fld.parts[fld.data[0]]
            meta[name] = bytes(value).decode() if value.dtype == np.uint8 else str(value.tolist()[0])
    if meta.get("general.architecture") != GGUF_ARCH:
        raise VectorError(f"{path} is not a control-vector GGUF (architecture {meta.get('general.architecture')!r})")
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1)) for t in r.tensors}
    out = {"model": meta.get(f"{GGUF_ARCH}.model_hint", ""), "format": "gguf.controlvector"}
    # steersweep.vectors.exchange's own keys: the concept, residual norms and metadata survive the round trip
    # (so vector_id and alpha_rel do not change); llama.cpp ignores them
    try:
        out.update(json.loads(meta.get("steersweep.meta", "{}")))
    except ValueError:
        raise VectorError(f"{path}: its steersweep.meta is not JSON; re-export the file") from None
    out.update({k: meta[f"steersweep.{k}"] for k in ("concept", "resid_norms") if f"steersweep.{k}" in meta})
    return tensors, out


_TL_KEY = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


def _layer_of(key: str) -> int:
    """Map a tensor name to the layer whose output it lives after."""
    m = _TL_KEY.match(key)
    if m:
        layer = int(m.group(1))
        # resid_pre of block L is the output of block L-1.
        return layer if m.group(2) == "post" else layer - 1
    for prefix in ("layer.", "direction."):  # ours; llama.cpp control vectors
        if key.startswith(prefix) and key[len(prefix) :].isdigit():
            return int(key[len(prefix) :])
    if key.isdigit():
        return int(key)
    raise VectorError(
        f"unrecognised vector key {key!r}: expected layer.N, blocks.N.hook_resid_post, "
        "blocks.N.hook_resid_pre, direction.N or N"
    )


def load(path: str | Path, concept: str | None = None) -> VectorSet:
    """Load vectors from .safetensors (ours or `direction.N`), .pt/.pth (weights_only) or .gguf."""
    path = Path(path)
    if not path.is_file():
        raise VectorError(f"vector file not found: {path} (set vectors.path to an existing file)")
    suffix = path.suffix.lower()
    meta: dict[str, str] = {}
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated or not a safetensors file
            raise VectorError(f"cannot read safetensors file {path}: {e}; re-save or re-download it") from None
    elif suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickles with code are refused by weights_only=True
            # our own reason, never PyTorch's advice to turn weights_only off (that runs the pickle)
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
            if found or "Weights only load failed" in str(e):
                why = "it pickles Python objects, not only tensors" + (f": {found[1]}" if found else "")
            else:
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VectorError(
                f"refused to load {path} with weights_only=True ({why}); save plain tensors in a dict "
                "or use safetensors"
            ) from None
        if not isinstance(obj, dict):
            raise VectorError(f"{path} holds a {type(obj).__name__}; expected a dict of hook name -> tensor")
        raw = {str(k): v for k, v in obj.items()}
    elif suffix == ".gguf":
        raw, meta = read_control_vector(path)
    else:
        raise VectorError(f"unsupported vector file type {suffix!r}: use .safetensors, .pt or .gguf")
    vecs: dict[int, torch.Tensor] = {}
    for key, t in raw.items():
        if not isinstance(t, torch.Tensor):
            raise VectorError(f"{path}: entry {key!r} is not a tensor")
        layer = _layer_of(key)
        if layer < 0:
            raise VectorError(f"{path}: {key} is the model input (before layer 0); it cannot be steered here")
        vecs[layer] = t.detach().float().reshape(-1) if t.ndim > 1 and t.shape[0] == 1 else t.detach().float()
    if not vecs:
        raise VectorError(f"{path} contains no vectors")
    resid = {int(k): float(v) for k, v in json.loads(meta.get("resid_norms", "{}")).items()}
    name = concept or meta.get("concept") or path.stem
    meta = {k: v for k, v in meta.items() if k not in ("norms", "resid_norms")}
    meta["source_file"] = str(path)
    return VectorSet(vecs, name, meta, resid)
