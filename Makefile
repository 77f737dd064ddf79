# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
DIR    ?= ./.portcullis
PORT   ?= 8443
BIN     = $(VENV)/bin

.PHONY: run test lint peers novnc bench soak fuzz dist clean

# noVNC, the in-browser VNC viewer the portal serves, at the version its lock file pins
# (npm; not committed). Without npm the portal runs and its viewer page says what to do.
NOVNC   = src/portcullis/webvnc/vendor

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## Create ./.portcullis on first use and run every role in one process.
run: $(BIN)/.installed novnc
	@test -f $(DIR)/portcullis.toml || $(BIN)/portcullis init --dir $(DIR) --port $(PORT)
	$(BIN)/portcullis up --dir $(DIR)

## Install the real peers the tests use (Debian packages, as root), lint, type-check, test.
test: $(BIN)/.installed peers novnc lint
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

peers:
	@scripts/install-peers

novnc: $(NOVNC)/node_modules/.package-lock.json

$(NOVNC)/node_modules/.package-lock.json: $(NOVNC)/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: the in-browser VNC viewer is not installed (apt-get install npm, then make novnc)"; exit 0; }
	cd $(NOVNC) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error

## Coverage-guided fuzzing of the parsers (atheris), FUZZ_SECONDS per target; `make test`
## runs the same targets for a few seconds each (tests/fuzz/test_fuzz.py).
FUZZ_SECONDS ?= 300
fuzz: $(BIN)/.installed
	$(BIN)/python tests/fuzz/fuzz_run.py --all --seconds $(FUZZ_SECONDS)

## The headline benchmark (bench/performance.py, docs/performance.md): every shape against
## stunnel, BENCH_ROUNDS interleaved rounds (default 5); updates bench/RESULTS.md.
bench: $(BIN)/.installed peers
	$(BIN)/python -m bench performance

## Scale and soak (docs/performance.md): 1,000 tunnels x 10 echoing streams for 10 minutes,
## then 10,000 idle tunnels. Smaller: make soak SOAK_SECONDS=60 SOAK_TUNNELS=100 IDLE_TUNNELS=1000
soak: $(BIN)/.installed
	$(BIN)/python -m bench soak tunnel_scale

## The full `portcullis` wheel, the light client's wheel (client-dist/) and the
## single-file client dist/portcullis-client.pyz, which the portal offers for download.
dist: $(BIN)/.installed
	rm -rf dist && mkdir dist
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist ./client-dist
	$(BIN)/python scripts/build_client_pyz.py dist

clean:
	rm -rf dist $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts $(NOVNC)/node_modules
