# The two commands: `make demo` (the main job) and `make test` (the test suite).
# Each bootstraps .venv with pip when it is missing or pyproject.toml changed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# Data: $VAE_DATA_DIR, else ./data, else the MNIST copy beside the checkout (../shared/data).
VAE_DATA_DIR ?= $(if $(wildcard data/MNIST/raw/*),$(CURDIR)/data,$(if $(wildcard ../shared/data/MNIST/raw/*),$(abspath ../shared/data),$(CURDIR)/data))
export VAE_DATA_DIR
export PREFECT_HOME ?= $(CURDIR)/.prefect
export DO_NOT_TRACK ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: help install demo test test-fast bench ui clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(VENV)/.installed  ## create .venv and install the project with its dev extra

demo: install  ## the main job: the training pipeline (train, evaluate, samples, register) on defaults
	$(PY) -m pipelines.demo

test: install  ## the whole test suite (tiny models and data; a few tests read the real MNIST)
	$(PY) -m pytest

test-fast: install  ## the tests not marked slow
	$(PY) -m pytest -m "not slow"

clean:  ## remove run outputs (keeps mlruns/ and .venv)
	rm -rf checkpoints samples outputs

# Scale-out stack (scripts/stack.sh): PostgreSQL databases, MLflow server, Prefect server + workers.
# Settings by environment or make variables: STACK_WORKERS=4 STACK_MLFLOW_PORT=5001 STACK_PREFECT_PORT=4201 ...
.PHONY: stack-up stack-down stack-status
stack-up: install  ## start the scale-out stack on 127.0.0.1 (state in .stack/; then: source .stack/env)
	PY=$(PY) scripts/stack.sh up

stack-down:  ## stop what stack-up started (STACK_PURGE=1 also drops its databases and .stack/)
	PY=$(PY) scripts/stack.sh down $(if $(STACK_PURGE),--purge)

stack-status:  ## the stack's processes, URLs and health
	PY=$(PY) scripts/stack.sh status
