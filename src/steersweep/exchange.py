"""Vector exchange with llama.cpp and repeng: writing control-vector GGUF files (reading them is
`vectors.load`, which dispatches on every vector format in one place).

Format: GGUF with `general.architecture = "controlvector"`, `controlvector.model_hint`,
`controlvector.layer_count`, and one float32 tensor `direction.{k}` per layer. llama.cpp adds
`direction.k` to the output of decoder block k (0-based) and never steers block 0, so
`direction.k` here means exactly our layer k, and layer 0 cannot be exported.
(repeng numbers its exports by hidden-state index, one higher; import such files with care.)

    python -m steersweep.exchange export vectors.safetensors out.gguf
    python -m steersweep.exchange import in.gguf vectors.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from .vectors import GGUF_ARCH as ARCH


def write_control_vector(vectors: dict[int, torch.Tensor], path: str | Path, model_hint: str = "") -> Path:
    """Write {layer: vector} as a llama.cpp control-vector GGUF (float32, exact)."""
    if 0 in vectors:
        raise ValueError("llama.cpp control vectors cannot steer layer 0: drop it before exporting")
    from .fileio import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, lambda tmp: _write_gguf(vectors, tmp, model_hint))
    return path


def _write_gguf(vectors: dict[int, torch.Tensor], tmp: Path, model_hint: str) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp), ARCH)
    w.add_string(f"{ARCH}.model_hint", model_hint or "unknown")
    w.add_uint32(f"{ARCH}.layer_count", len(vectors))
    for layer in sorted(vectors):
        w.add_tensor(f"direction.{layer}", vectors[layer].detach().float().cpu().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv: list[str]) -> None:
    from .vectors import VectorSet, load, save

    if len(argv) != 3 or argv[0] not in ("export", "import"):
        sys.exit("usage: python -m steersweep.exchange export VECTORS OUT.gguf | import IN.gguf OUT.safetensors")
    op, src, dst = argv
    vs = load(src)
    if op == "export":
        write_control_vector(vs.vectors, dst, vs.meta.get("model", ""))
    else:
        save(VectorSet(vs.vectors, vs.concept, vs.meta), dst)
    print(f"wrote {dst} ({len(vs.vectors)} layers)")


if __name__ == "__main__":
    main(sys.argv[1:])
