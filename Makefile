# Two commands set everything up on a fresh machine:
#   make run    create .venv, install, run the main job (the notebook pipeline)
#   make test   create .venv, install with the dev extras, lint and run every test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PARAMS ?= auto
# make test: one pytest-xdist worker per logical CPU; a test file's tests on one worker, the
# notebooks in order on one (conftest.py); TEST_WORKERS=0 runs everything in one process
TEST_WORKERS ?= logical
# the real dataset beside this checkout, when there is one (see README: the data)
export BRAINSEG_DATA ?= $(abspath $(wildcard ../shared/data/brain-tumor-coco))

.PHONY: run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/brainseg run --params $(PARAMS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=15 tests notebooks --nbval-lax --nbval-current-env

clean:
	rm -rf runs .pytest_cache
