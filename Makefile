# flyswarm — developer and local-loop entry points.
# `make up` and `make test` create .venv and install pinned dependencies on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes for `make test` (pytest-xdist). Most tests wait on processes and Redis rather than
# burn CPU, so more workers than cores still shortens the run; 0 runs in-process (easier debugging).
PYTEST_WORKERS ?= 4

.PHONY: help install lint format typecheck test test-unit wheel-check up down status logs demo clean bench

help:
	@echo "make up        start the local stack (Redis, Fly emulator, scripted model, API, controller)"
	@echo "make down      stop everything make up started"
	@echo "make status    show components, sessions by phase, machines by state"
	@echo "make logs      follow the components' logs"
	@echo "make demo      (make up, then) apply manifests/examples/ and follow one session to completion"
	@echo "make test      run the whole test suite (PYTEST_WORKERS=4 parallel workers)"
	@echo "make test-unit run only the pure unit tests (no Redis, no processes): seconds"
	@echo "make lint      ruff (lint + format check) and mypy --strict"
	@echo "make wheel-check build the wheel, install it in a fresh venv: only flyswarm, and its command runs"
	@echo "make bench     run the benchmarks in bench/"
	@echo "make clean     remove .local/"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,agent,local]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy api controller agent gateway local cli flyswarm examples

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy api controller agent gateway local cli flyswarm examples

test: $(STAMP)
	@start=$$(date +%s); \
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS); status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s wall time"; exit $$status

wheel-check: $(STAMP)
	$(BIN)/python -m pytest -q tests/sdk/test_wheel.py

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m unit -q $(PYTEST_ARGS)

up: $(STAMP)
	$(BIN)/flyswarm up

down: $(STAMP)
	$(BIN)/flyswarm down

status: $(STAMP)
	$(BIN)/flyswarm status

logs: $(STAMP)
	$(BIN)/flyswarm logs-follow

demo: $(STAMP)
	$(BIN)/flyswarm up
	$(BIN)/flyswarm demo

bench: $(STAMP)
	$(BIN)/python bench/api.py
	$(BIN)/python bench/controller.py
	$(BIN)/python bench/agent.py

clean:
	-test -x $(BIN)/flyswarm && $(BIN)/flyswarm down
	rm -rf "$${FLYSWARM_LOCAL_DIR:-.local}"
