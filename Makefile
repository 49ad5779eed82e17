# Two commands on a fresh machine (see README):
#   make demo   set up .venv and run the embedded demo (writes demo-out/last_frame.png)
#   make test   set up .venv with the dev extra and run lint + the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(BIN)/firmware-app demo --out demo-out

lint: $(VENV)/.dev
	$(BIN)/ruff check firmware_app tests tools
	$(BIN)/ruff format --check firmware_app tests tools

test: lint
	$(BIN)/python -m pytest

bench: $(VENV)/.runtime
	$(BIN)/firmware-app bench --json

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
