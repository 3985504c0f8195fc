# Everyday commands. `make serve` and `make test` are the README's quick start: each sets
# up its own virtual environment in .venv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

JS_DEPS := tests/js/node_modules/.package-lock.json

.PHONY: setup serve test socketio-matrix check lint typecheck validate bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The browser-side contract tests run socket.io-client under Node; without npm they skip.
$(JS_DEPS): tests/js/package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/js --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the JavaScript client tests will be skipped"; fi

serve: $(STAMP)
	$(BIN)/policy-engine serve --policies policies/policies.yaml --host 127.0.0.1 --port 8000 --ops-port 8001

lint: $(STAMP)
	$(BIN)/ruff check policy_engine tests benchmarks
	$(BIN)/ruff format --check policy_engine tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/lint-imports

validate: $(STAMP)
	$(BIN)/policy-engine validate policies/policies.yaml policies/examples/*.yaml
	$(BIN)/policy-engine test policies/tests

test: $(STAMP) $(JS_DEPS) lint typecheck validate
	$(BIN)/pytest

# The Socket.IO tests on both ends of the supported python-socketio and python-engineio
# ranges, each in a venv of its own (CI runs it after `make test`).
socketio-matrix: $(JS_DEPS)
	.ci/socketio-matrix

bench: $(STAMP)
	$(BIN)/python -m benchmarks.validate_bench
	$(BIN)/python -m benchmarks.decision_bench
	$(BIN)/python -m benchmarks.hook_bench
	$(BIN)/python -m benchmarks.store_bench
	$(BIN)/python -m benchmarks.store_faults
	$(BIN)/python -m benchmarks.echo_bench throughput
	$(BIN)/python -m benchmarks.echo_bench memory
	$(BIN)/python -m benchmarks.cluster_bench

# Hostile traffic against a live server under the shipped policy: the fuzz suite with new
# examples (FUZZ_EXAMPLES per property; the default run replays 20), then the long run.
FUZZ_EXAMPLES ?= 200
FUZZ_EVENTS ?= 100000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -m fuzz tests/test_fuzz.py
	PYTHONPATH=$(CURDIR) $(BIN)/python -m benchmarks.fuzz_run --events $(FUZZ_EVENTS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis tests/js/node_modules
