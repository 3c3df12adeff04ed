# aichor: `make run` starts the dashboard and the worker on embedded defaults; `make test` runs
# the suite (with CI=true against PostgreSQL, Redis and a real Docker Engine).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run setup test bench lint services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

# Without npm the dashboard still runs; only the in-browser terminal lacks xterm.js.
NPM := $(shell command -v npm)
setup: $(VENV)/.installed $(if $(NPM),node_modules/.installed)
	@$(if $(NPM),,echo "npm not found: the in-browser terminal needs it (apt-get install npm)")

run: export AICHOR_PUBLIC_URL ?= http://$(HOST):$(PORT)
run: export AICHOR_LOCAL_ENGINE ?= true
run: export AICHOR_ALLOW_LOCAL_REPOS ?= true
# A trial on one machine may point notifications at a receiver on this machine.
run: export AICHOR_OUTBOUND_ALLOW_NETWORKS ?= 127.0.0.0/8,::1/128
run: setup
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	@HOST=$(HOST) PORT=$(PORT) BIN=$(BIN) scripts/run.sh

services:
	@scripts/services.sh

# Parallel test workers (0: in this process). Most tests wait on Docker, git, a worker thread or
# a browser rather than on the CPU, so more workers than cores pay.
PYTEST_WORKERS ?= 3
test: setup services
	@if [ "$$CI" = "true" ]; then \
	  export DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/aichor}; \
	  export REDIS_URL=$${REDIS_URL:-redis://127.0.0.1:6379/0}; \
	fi; \
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0 && \
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

bench: setup services
	$(BIN)/python bench/run_all.py $(BENCH)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf var .pytest_cache
