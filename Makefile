# `make train` and `make test` do all the set-up on a fresh machine with Python 3.11 and the package index.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install train test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"  # pinned first: where a local CPU wheel exists pip takes it
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

train: install
	$(PY) src/train.py experiment=dlr_vs_grpo

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

# ruff (configured in pyproject.toml): lint rules and the formatter's check, no files changed.
lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
