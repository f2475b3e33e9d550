# nearvoice: `make run` starts an edge node, `make test` runs lint, types and tests.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= .nearvoice
PORT   ?= 8080
# torch is installed before the export extra, so that the build named here is the one kept
# (pip keeps an installed torch that satisfies the extra's range). torch==2.13.0 is the CPU
# build where a local CPU wheel exists; elsewhere take it from PyTorch's CPU index:
#   make TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: run test lint typecheck pytest bench sysdeps clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[dev,export]'
	touch $@

install: $(VENV)/.installed

sysdeps:
	./scripts/system-deps.sh

run: $(VENV)/.installed
	$(BIN)/nearvoice up --data-dir $(DATA)/stack --base-port $(PORT)

lint: $(VENV)/.installed
	$(BIN)/ruff check nearvoice/*.py edge origin export tests bench
	$(BIN)/ruff format --check nearvoice/*.py edge origin export tests bench

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed sysdeps
	$(BIN)/python -m pytest

test: lint typecheck pytest

# Results go to ./bench-results/<bench>/<UTC>.json; the report gathers the latest of each.
bench: $(VENV)/.installed sysdeps
	$(BIN)/nearvoice bench hit-path
	$(BIN)/nearvoice bench miss-latency
	$(BIN)/nearvoice bench offload
	$(BIN)/nearvoice bench workers
	$(BIN)/nearvoice bench realtime
	$(BIN)/nearvoice bench report

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
