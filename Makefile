# crmsync: `make run` starts the local stack, `make test` runs the whole suite against a real broker.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA_STAMP := .cache/kafka/.fetched

.PHONY: run test test-unit lint bench clean setup kafka

setup: $(STAMP) $(KAFKA_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Apache Kafka's broker and tools jars from Maven Central, once.
$(KAFKA_STAMP): $(STAMP) crmsync/deploy/local/pom.xml
	$(BIN)/crmsync kafka fetch
	touch $(KAFKA_STAMP)

run: setup
	$(BIN)/crmsync up

test: setup
	$(BIN)/python -m pytest -p no:cacheprovider tests

test-unit: setup
	$(BIN)/python -m pytest -p no:cacheprovider tests/unit

lint: setup
	$(BIN)/ruff check crmsync tests bench
	$(BIN)/ruff format --check crmsync tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/codec.py

clean:
	rm -rf .local
