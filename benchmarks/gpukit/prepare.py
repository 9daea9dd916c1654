"""`python -m gpukit.prepare [--kit DIR] [--no-wheels]` (`make gpu-kit`): what the GPU node lacks, in one folder.

- `tokenizer/`: the embedded model's tokenizer files (a few MB; the checkpoint itself is too large to
  carry, and the node has no hub). Its ids fit every shipped vocabulary.
- `wheels/`: pure-Python wheels for Python 3.12 of the packages the node lacks, at the versions this
  checkout's venv runs (so what the node runs is what the tests ran): hydra-core, omegaconf,
  antlr4-python3-runtime (an sdist only: built here with `pip wheel`), submitit,
  hydra-submitit-launcher, gguf, steering-vectors. Each wheel's Requires-Dist is checked against
  what the node has (NODE_HAS); a requirement it lacks and the kit does not carry stops here.
The folder must stay under the 64 MiB that travel to the node, with the working tree.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

from .common import KIT

CARRIED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "submitit", "hydra-submitit-launcher", "gguf",
           "steering-vectors")  # fmt: skip
SDIST_ONLY = {"antlr4-python3-runtime"}
# The node's Python packages this kit's wheels may need (docs/gpu.md; the device tool's package list).
NODE_HAS = {"torch", "transformers", "accelerate", "huggingface-hub", "tokenizers", "safetensors", "numpy", "pandas",
            "pyarrow", "pyyaml", "packaging", "cloudpickle", "typing-extensions", "tqdm", "requests", "scikit-learn",
            "scipy", "matplotlib", "psutil", "importlib-resources", "jinja2", "filelock", "fsspec", "sympy",
            "networkx", "regex", "pillow"}  # fmt: skip
NODE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "os_name": "posix", "extra": ""}  # fmt: skip
MAX_BYTES = 48 * 2**20  # the kit's share of the 64 MiB that travel


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> list[str]:
    """NAME==VERSION of each carried package, as installed in this venv."""
    return [f"{n}=={version(n)}" for n in CARRIED]


def download(wheels: Path) -> None:
    pip = [sys.executable, "-m", "pip"]
    plat = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
            "--platform", "any", "--only-binary=:all:"]  # fmt: skip
    for spec in pinned():
        if norm(spec.split("==")[0]) in SDIST_ONLY:
            subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), spec], check=True)
        else:
            subprocess.run([*pip, "download", "-q", "--no-deps", *plat, "-d", str(wheels), spec], check=True)


def requirements(wheel: Path) -> list[str]:
    """Names in the wheel's Requires-Dist that apply on the node (Python 3.12 on x86-64 Linux, no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [norm(r.name) for r in reqs if r.marker is None or r.marker.evaluate(NODE_ENV)]


def check(wheels: Path) -> list[str]:
    """What a carried wheel needs that neither the node nor the kit has."""
    carried = {norm(w.name.split("-")[0]) for w in wheels.glob("*.whl")}
    missing = []
    for w in sorted(wheels.glob("*.whl")):
        missing += [f"{w.name} needs {r}" for r in requirements(w) if r not in NODE_HAS | carried]
    return missing


def tokenizer(kit: Path) -> None:
    from transformers import AutoTokenizer

    from steersweep.model.embedded import DEFAULT_MODEL_DIR, prepare

    AutoTokenizer.from_pretrained(prepare(DEFAULT_MODEL_DIR)).save_pretrained(kit / "tokenizer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpukit.prepare", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--kit", type=Path, default=KIT)
    ap.add_argument("--no-wheels", action="store_true", help="the tokenizer only (the CPU dry run needs no wheels)")
    a = ap.parse_args(argv)
    a.kit.mkdir(parents=True, exist_ok=True)
    tokenizer(a.kit)
    if not a.no_wheels:
        wheels = a.kit / "wheels"
        for old in wheels.glob("*.whl"):
            old.unlink()
        wheels.mkdir(exist_ok=True)
        download(wheels)
        missing = check(wheels)
        if missing:
            print("error: the node would lack: " + "; ".join(missing) + " (add them to CARRIED)", file=sys.stderr)
            return 1
    size = sum(p.stat().st_size for p in a.kit.rglob("*") if p.is_file())
    if size > MAX_BYTES:
        print(f"error: {a.kit} holds {size / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB it may carry",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"{a.kit}: {size / 2**20:.1f} MiB ({', '.join(p.name for p in sorted((a.kit / 'wheels').glob('*.whl')))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
