"""Vector exchange with llama.cpp and repeng: writing control-vector GGUF files (reading them is
`vectors.load`, which dispatches on every vector format in one place).

Format: GGUF with `general.architecture = "controlvector"`, `controlvector.model_hint`,
`controlvector.layer_count`, and one float32 tensor `direction.{k}` per layer. llama.cpp adds
`direction.k` to the output of decoder block k (0-based) and never steers block 0, so
`direction.k` here means exactly our layer k, and layer 0 cannot be exported.
(repeng numbers its exports by hidden-state index, one higher; import such files with care.)
Our exports also carry `steersweep.concept`, `steersweep.resid_norms` (JSON) and `steersweep.meta`
(JSON), which llama.cpp ignores: importing one back gives the same concept, vector ids and alpha_rel.

    python -m steersweep.vectors.exchange export vectors.safetensors out.gguf
    python -m steersweep.vectors.exchange import in.gguf vectors.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from steersweep.core.fileio import atomic_write_bytes
from steersweep.vectors.vectorset import GGUF_ARCH as ARCH
from steersweep.vectors.vectorset import VectorSet, load, save


def write_control_vector(
    vectors: dict[int, torch.Tensor],
    path: str | Path,
    model_hint: str = "",
    concept: str | None = None,
    resid_norms: dict[int, float] | None = None,
    meta: dict[str, str] | None = None,
) -> Path:
    """Write {layer: vector} as a llama.cpp control-vector GGUF (float32, exact).

    Args:
        vectors: layer -> vector; layer 0 cannot be exported (llama.cpp never steers it).
        path: the .gguf file to write (atomically).
        model_hint: the model the vectors are for (`controlvector.model_hint`).
        concept, resid_norms, meta: a VectorSet's concept, mean residual norms per layer and
            metadata, kept under `steersweep.*` keys so `vectors.load` restores them.
    """
    if 0 in vectors:
        raise ValueError("llama.cpp control vectors cannot steer layer 0: drop it before exporting")

    extra = {}
    if concept:
        extra["steersweep.concept"] = concept
    if resid_norms:
        extra["steersweep.resid_norms"] = json.dumps({str(k): float(v) for k, v in resid_norms.items()})
    kept = {k: v for k, v in (meta or {}).items() if k not in ("format", "source_file", "concept")}
    if kept:
        extra["steersweep.meta"] = json.dumps(kept, sort_keys=True)
    path = Path(path)
    atomic_write_bytes(path, lambda tmp: _write_gguf(vectors, tmp, model_hint, extra))
    return path


def _write_gguf(vectors: dict[int, torch.Tensor], tmp: Path, model_hint: str, extra: dict[str, str]) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp), ARCH)
    w.add_string(f"{ARCH}.model_hint", model_hint or "unknown")
    w.add_uint32(f"{ARCH}.layer_count", len(vectors))
    for key, value in extra.items():
        w.add_string(key, value)
    for layer in sorted(vectors):
        w.add_tensor(f"direction.{layer}", vectors[layer].detach().float().cpu().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in ("export", "import"):
        sys.exit(
            "usage: python -m steersweep.vectors.exchange export VECTORS OUT.gguf | import IN.gguf OUT.safetensors"
        )
    op, src, dst = argv
    vs = load(src)
    if op == "export":
        write_control_vector(vs.vectors, dst, vs.meta.get("model", ""), vs.concept, vs.resid_norms, vs.meta)
    else:
        save(VectorSet(vs.vectors, vs.concept, vs.meta, vs.resid_norms), dst)
    print(f"wrote {dst} ({len(vs.vectors)} layers)")


if __name__ == "__main__":
    main(sys.argv[1:])
