# HDX — run it, test it, check it. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(PYTHON) -m uv
VENV := .venv
BIN := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format bench-consent clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/hdx: pyproject.toml uv.lock shared/pyproject.toml services/*/pyproject.toml
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet 'uv>=0.5,<1'
	$(UV) sync --frozen
	@touch $(BIN)/hdx

install: $(BIN)/hdx ## Install HDX and its dev tools into .venv (uv workspace, locked)

run: install ## Run HDX: embedded broker, SQLite under data/, all three services, demo seed
	$(BIN)/hdx run

test: install ## Run the whole suite, flow tests on a real broker included
	$(BIN)/pytest

test-fast: install ## Unit tests only (no broker, no database)
	$(BIN)/pytest -m "not broker and not postgres"

lint: install ## ruff, mypy (strict) and the architecture contracts (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared/src services/patient-index/src services/consent/src services/exchange/src
	$(BIN)/lint-imports

format: install ## Format the code with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-consent: install ## Benchmark consent decisions (100k patients): rate, p50/p95/p99 → bench/results/
	$(BIN)/python bench/consent_bench.py

clean: ## Remove data/, caches and the virtualenv
	rm -rf data .pytest_cache .mypy_cache .ruff_cache $(VENV)
