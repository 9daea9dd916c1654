#!/usr/bin/env bash
# On the GPU node, from the checkout's root: bash benchmarks/gpukit/node.sh [OUT] [gpukit options]
# Installs the kit's wheels (.gpukit/wheels, made by `make gpu-kit`) into a temporary site folder, then
# runs every check: OUT/gpukit.json and OUT/gpukit.log (OUT defaults to $OUT). No registry, no hub.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
out="${1:-${OUT:?usage: node.sh OUT [gpukit options]}}"
shift || true
mkdir -p "$out"
site="$(mktemp -d)/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .gpukit/wheels/*.whl \
  >"$out/install.log" 2>&1 || { cat "$out/install.log"; echo "error: the kit's wheels did not install"; exit 3; }
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv >>"$out/gpukit.log" 2>&1
exec python3 -m gpukit --out "$out" "$@"
