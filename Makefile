# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
DIR    ?= ./.portcullis
PORT   ?= 8443
BIN     = $(VENV)/bin

.PHONY: run test lint peers bench fuzz dist clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## Create ./.portcullis on first use and run every role in one process.
run: $(BIN)/.installed
	@test -f $(DIR)/portcullis.toml || $(BIN)/portcullis init --dir $(DIR) --port $(PORT)
	$(BIN)/portcullis up --dir $(DIR)

## Install the real peers the tests use (Debian packages, as root), lint, type-check, test.
test: $(BIN)/.installed peers lint
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

peers:
	@scripts/install-peers

## Coverage-guided fuzzing of the parsers (atheris), FUZZ_SECONDS per target; `make test`
## runs the same targets for a few seconds each (tests/fuzz/test_fuzz.py).
FUZZ_SECONDS ?= 300
fuzz: $(BIN)/.installed
	$(BIN)/python tests/fuzz/fuzz_run.py --all --seconds $(FUZZ_SECONDS)

bench: $(BIN)/.installed peers
	$(BIN)/python -m bench

## The full `portcullis` wheel, the light client's wheel (client-dist/) and the
## single-file client dist/portcullis-client.pyz, which the portal offers for download.
dist: $(BIN)/.installed
	rm -rf dist && mkdir dist
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist ./client-dist
	$(BIN)/python scripts/build_client_pyz.py dist

clean:
	rm -rf dist $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
