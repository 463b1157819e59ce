# HDX — run it, test it, check it. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(PYTHON) -m uv
VENV := .venv
BIN := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help install run test test-reliability test-fast lint format bench bench-postgres bench-smoke bench-profile bench-consent bench-mpi bench-broker clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/hdx: pyproject.toml uv.lock shared/pyproject.toml services/*/pyproject.toml
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet 'uv>=0.5,<1'
	$(UV) sync --frozen
	@touch $(BIN)/hdx

install: $(BIN)/hdx ## Install HDX and its dev tools into .venv (uv workspace, locked)

run: install ## Run HDX: embedded broker, SQLite under data/, all three services, demo seed and keys (prints how to get a token); RUN_ARGS="--exchange-stages …" passes options
	$(BIN)/hdx run $(RUN_ARGS)

test: install ## Run the whole suite, flow tests on a real broker included
	$(BIN)/pytest

test-reliability: install ## The long broker-restart run (the crash run is in make test), figures → bench/results/
	$(BIN)/pytest tests/reliability -m soak -s

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

BENCH_ARGS ?=

bench: install ## End-to-end benchmark: 3 services, 50k messages, p99 at 1,000/s, vs a bare relay → bench/results/
	$(BIN)/python bench/exchange_bench.py $(BENCH_ARGS)

bench-postgres: install ## The end-to-end benchmark with PostgreSQL at 127.0.0.1:5432 (a fresh database per service)
	$(BIN)/python bench/exchange_bench.py --postgres $(BENCH_ARGS)

bench-smoke: install ## A quick end-to-end benchmark (3,000 messages, 5 s at 1,000/s) to check it runs
	$(BIN)/python bench/exchange_bench.py --messages 3000 --rate-seconds 5 --light-seconds 5 \
		--name exchange-smoke $(BENCH_ARGS)

bench-profile: install ## py-spy the three services through a 10,000-message run, summarised (bench/results/profiles/)
	$(BIN)/python bench/exchange_bench.py --messages 10000 --rate-seconds 5 --light-seconds 5 \
		--skip-ceiling --profile exchange,patient-index,consent $(BENCH_ARGS)
	$(BIN)/python bench/profile_summary.py $$(ls -t bench/results/profiles/*.txt | head -3)

bench-consent: install ## Benchmark consent decisions (100k patients): rate, p50/p95/p99 → bench/results/
	$(BIN)/python bench/consent_bench.py

bench-mpi: install ## Benchmark patient matching (FEBRL3/4, synthetic FHIR, 100k latency) vs Splink and recordlinkage → bench/results/
	$(BIN)/python bench/mpi_bench.py

bench-broker: install ## The embedded broker alone: what a consumer's fetches cost it, by partitions, fetch wait and records held → bench/results/
	$(BIN)/python bench/broker_probe.py

clean: ## Remove data/, caches and the virtualenv
	rm -rf data .pytest_cache .mypy_cache .ruff_cache $(VENV)
