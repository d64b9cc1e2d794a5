# The two commands a user needs: `make run` (set up, generate the demo data, run the pipeline) and `make test`.
# Telemetry is off and third-party noise quiet wherever covidcxr is imported (covidcxr.runtime); the same telemetry
# settings are exported to every recipe here and written into .venv/bin/activate (below), and DVC's analytics and
# update check are off in .dvc/config.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
FAST := not slow and not infra and not fuzz
# Three pytest-xdist workers on 2 cores: much of the suite waits on subprocesses, servers and single-threaded
# start-ups, which a third worker fills (whole suite 568 s against 605 s with two, the same CPU time; measured
# 2026-12-07, when xdist scheduled test by test). A file's tests stay in one worker (tests/conftest.py): with that
# mended, 1566 tests in 432 s (fresh-clone CI 7 min 54 s, 2026-12-08). WORKERS=0 runs in one process.
WORKERS ?= 3
PYTEST := python -m pytest $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadgroup)

export PATH := $(BIN):$(PATH)
# Telemetry off for what never imports covidcxr (`mlflow run`, `mlflow ui`/`server`, `mlflow models serve`, `dvc`): the
# variables of covidcxr.runtime.TELEMETRY_OFF (tests/pipelines/test_tooling.py checks they agree), exported to every
# recipe, added to .venv/bin/activate by `make setup` (target telemetry-off) and exported by .ci/run.
TELEMETRY_OFF := MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
$(foreach setting,$(TELEMETRY_OFF),$(eval export $(setting)))
ACTIVATE_TELEMETRY_OFF = line='export $(TELEMETRY_OFF)  \# covidcxr: telemetry off (Makefile)'; \
  grep -qxF "$$line" $(BIN)/activate || echo "$$line" >> $(BIN)/activate

.PHONY: run test test-fast lint deps setup telemetry-off data bench lock clean

run: setup data  ## set up, generate the demo data and run the whole pipeline
	dvc repro

test: setup  ## run the whole test suite (what CI runs), with the slowest tests listed
	$(PYTEST) --durations=15

test-fast: setup  ## all but the slow, infra and fuzz tests (pipeline runs, servers, fuzzing): about 2.5 min on 2 cores
	$(PYTEST) -m "$(FAST)"

lint: setup  ## ruff on the library, the stages, the tests and the benchmarks; dvc.yaml deps against the imports
	ruff check src pipelines tests bench
	python -m pipelines._deps

deps: setup  ## rewrite the code deps of every stage in dvc.yaml from what its module imports
	python -m pipelines._deps --write

setup: $(VENV)/.installed  ## virtual environment with the exact pins of requirements.lock

$(VENV)/.installed: requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "covidcxr needs Python 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	@# uv installs the same pins as pip in a tenth of the time (about 20 s instead of 3 min on 2 cores)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$$(grep '^uv==' requirements.lock)"
	@# and compiles every module to bytecode now: where PYTHONDONTWRITEBYTECODE is set (CI images, this machine), Python
	@# would otherwise recompile TensorFlow and Keras in every process, about 5 s of each stage's and test's start
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements.lock
	@# built by the lock's setuptools, not by the newest one an isolated build environment would download
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# after the venv command, which rewrites bin/activate
	@$(ACTIVATE_TELEMETRY_OFF)
	touch $@

telemetry-off:  ## add the telemetry settings to the environment's bin/activate (once; make setup does it)
	@$(ACTIVATE_TELEMETRY_OFF)

data: setup  ## the embedded demo dataset in data/demo (byte-identical to what data.dvc records)
	@if [ ! -f data/demo/labels.csv ]; then covidcxr demo-data data/demo; fi
	dvc add --quiet data
	@git diff --quiet -- data.dvc || { echo "data/ differs from the committed data.dvc (see git diff data.dvc)" >&2; exit 1; }

bench: setup data  ## every benchmark, each figure beside its same-run baseline, in bench/results.json (BENCH_ARGS=--smoke: seconds)
	python -m bench $(BENCH_ARGS)

lock:  ## re-pin the environment after changing pyproject.toml (the one source of exact versions)
	( echo "# Exact pins for the whole environment (pip freeze of a working install; regenerate with 'make lock')."; \
	  $(BIN)/python -m pip freeze --all --exclude-editable | grep -v -e '^covidcxr' -e '^pip==' ) > requirements.lock

clean:  ## remove pipeline outputs and the MLflow store (not the data, not the environment)
	@# register's and model_card's reports too: they name versions of the store removed here, and with them missing
	@# `make run` registers the model, and logs its card, in the new store (DVC never restores them from its run cache)
	rm -rf artifacts mlruns mlflow.db reports/register reports/model_card
