# nearvoice: `make run` starts an edge node, `make test` runs lint, types and tests.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= .nearvoice
PORT   ?= 8080

.PHONY: run test lint typecheck pytest bench sysdeps clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,export]'
	touch $@

install: $(VENV)/.installed

sysdeps:
	./scripts/system-deps.sh

run: $(VENV)/.installed
	$(BIN)/nearvoice up --data-dir $(DATA)/stack --base-port $(PORT)

lint: $(VENV)/.installed
	$(BIN)/ruff check edge origin export tests bench
	$(BIN)/ruff format --check edge origin export tests bench

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed sysdeps
	$(BIN)/python -m pytest

test: lint typecheck pytest

bench: $(VENV)/.installed sysdeps
	$(BIN)/python -m bench.hit_path
	$(BIN)/python -m bench.miss_latency
	$(BIN)/python -m bench.offload

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
