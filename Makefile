# The README's quick start is `make run` and `make test`; both bootstrap .venv themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR := .run

.PHONY: help venv run test lint unit bench proto clean

help:
	@echo "make run    set up .venv and run a GPU inventory scan on simulated GPUs"
	@echo "make test   set up .venv, start the test servers, run lint, mypy and the tests"
	@echo "make bench  run the benchmarks under bench/"
	@echo "make lint   ruff check, ruff format --check, mypy"
	@echo "make proto  regenerate the gRPC code from proto/"

$(STAMP): pyproject.toml scripts/bootstrap-venv.sh
	PYTHON=$(PYTHON) scripts/bootstrap-venv.sh $(VENV)
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $@

venv: $(STAMP)

# The main job on simulated GPUs: three VMs come and go; the third lands on the
# physical GPUs the first one had. The scans go to SQLite and stdout, then the
# history shows which GPUs moved between machines.
run: $(STAMP)
	@rm -rf $(RUN_DIR) && mkdir -p $(RUN_DIR)
	@export CLUSTER_NAME=demo SQLITE_PATH=$(RUN_DIR)/inventory.db LOG_FORMAT=text; \
	set -e; \
	echo "== node-a (machine i-0a) has the GPUs of DGX #1"; \
	$(BIN)/gpufleet inventory scan --simulate dgx-h100 --seed 1 --node node-a --machine-id i-0a -e stdout,sqlite; \
	echo "== node-b (machine i-0b) has the GPUs of DGX #2"; \
	$(BIN)/gpufleet inventory scan --simulate dgx-h100 --seed 2 --node node-b --machine-id i-0b -e sqlite; \
	echo "== node-c (machine i-0c) lands on the GPUs of DGX #1 again"; \
	$(BIN)/gpufleet inventory scan --simulate dgx-h100 --seed 1 --node node-c --machine-id i-0c -e sqlite; \
	echo "== which GPUs moved between machines?"; \
	$(BIN)/gpufleet inventory history --moved

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

test: lint
	scripts/ensure-kubectl.sh
	scripts/test-servers.sh start
	$(BIN)/pytest -q; rc=$$?; scripts/test-servers.sh stop; exit $$rc

# The peers the benchmarks compare against (nvitop-exporter) come from the bench extra.
$(VENV)/.installed-bench: $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[all,dev,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	@set -e; for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

proto: $(STAMP)
	scripts/gen-proto.sh

clean:
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache .mypy_cache .ruff_cache
