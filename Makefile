# crmsync: `make run` starts the local stack, `make test` runs the whole suite against a real broker.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA_STAMP := .cache/kafka/.fetched
# The card's code folders: each holds its part of the one `crmsync` namespace package.
CODE := schemas streams control deploy

.PHONY: run test test-unit test-e2e chaos lint bench clean setup kafka browser

setup: $(STAMP) $(KAFKA_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Apache Kafka's broker and tools jars from Maven Central, once.
$(KAFKA_STAMP): $(STAMP) deploy/crmsync/deploy/local/pom.xml
	$(BIN)/crmsync kafka fetch
	touch $(KAFKA_STAMP)

run: setup
	$(BIN)/crmsync up

# Tests run on TEST_WORKERS pytest-xdist workers, each with its own broker (`TEST_WORKERS=0`: one
# process, e.g. against an external KAFKA_BOOTSTRAP_SERVERS).
TEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider

test: setup browser
	$(PYTEST) -n $(TEST_WORKERS) --dist loadgroup --durations=20

test-e2e: setup browser
	$(BIN)/python -m pytest -p no:cacheprovider tests/e2e

# Debian's Chromium for the browser tests (Playwright drives it; it downloads no browser).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else \
			echo "tests/e2e need /usr/bin/chromium: run 'sudo apt-get install -y chromium'" >&2; \
		fi; \
	fi

test-unit: setup
	$(BIN)/python -m pytest -p no:cacheprovider tests/unit

# The chaos tier at full size (`make test` runs it short); rewrites docs/reliability.md's table.
chaos: setup
	CRMSYNC_CHAOS=$${CRMSYNC_CHAOS:-full} $(BIN)/python -m pytest -p no:cacheprovider tests/chaos

lint: setup
	$(BIN)/ruff check $(CODE) tests bench
	$(BIN)/ruff format --check $(CODE) tests bench
	$(BIN)/mypy
	MYPYPATH=bench $(BIN)/mypy tests bench

# Every benchmark on this machine, then one table of all figures against the targets.
bench: setup
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/sinks.py
	$(BIN)/python bench/http_clients.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/control.py
	$(BIN)/python bench/resources.py
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/target_requests.py
	$(BIN)/python bench/emulators.py
	$(BIN)/python bench/report.py

clean:
	rm -rf .local
