# The README's quick start is `make run` and `make test`; both bootstrap .venv themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR := .run

CORE_STAMP := $(VENV)/.installed-core
# Integration tests of the extras' client libraries (psycopg, boto3, httpx,
# cryptography, kubernetes_asyncio, kopf), run again at the declared floors.
FLOOR_TESTS := tests/unit --ignore=tests/unit/test_deviceapi_generated.py \
	tests/integration/test_postgres_exporter.py tests/integration/test_s3_exporter.py \
	tests/integration/test_http_exporter.py tests/integration/test_kcache_oci.py \
	tests/integration/test_kube_client.py tests/integration/test_kube_watch.py \
	tests/integration/test_kube_exec.py tests/integration/test_kube_lease.py \
	tests/integration/test_kcache_operator.py tests/integration/test_kubeapi_double_crd_kopf.py

.PHONY: help venv run test lint unit bench proto manifests image clean

help:
	@echo "make run    set up .venv with the core only and run a GPU inventory scan on simulated GPUs"
	@echo "make test   set up .venv (all extras + dev tools), .venv-core and .venv-floor, start the"
	@echo "            test servers, run lint, mypy and the tests (floor venv: unit + client tests)"
	@echo "make unit   the unit tests only (no servers)"
	@echo "make lint   ruff check, ruff format --check, mypy"
	@echo "make bench  run the benchmarks under bench/"
	@echo "make image  build the container image localhost/gpufleet:VERSION with buildah (and"
	@echo "            build/image/gpufleet-VERSION.oci.tar); PUSH=host:port/repo also pushes it"
	@echo "make proto  regenerate the gRPC code from proto/ with the pinned grpcio-tools"
	@echo "make manifests  render every overlay into dist/install-<feature>.yaml (IMAGE=repo"
	@echo "            overrides $(DEFAULT_IMAGE)) and regenerate the tables in docs/deploy.md"
	@echo "make venv   set up .venv with all extras and the dev tools"
	@echo "make clean  remove the venvs, the demo's files and the tool caches"
	@echo "make help   this list"

$(STAMP): pyproject.toml scripts/bootstrap-venv.sh
	PYTHON=$(PYTHON) scripts/bootstrap-venv.sh $(VENV)
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $@ $(CORE_STAMP)

# `make run` needs the core only: no extras, no test tools (Triton alone is ~1 GB).
$(CORE_STAMP): pyproject.toml scripts/bootstrap-venv.sh
	PYTHON=$(PYTHON) scripts/bootstrap-venv.sh $(VENV)
	$(BIN)/pip install --quiet -e .
	touch $@

venv: $(STAMP)

# The main job on simulated GPUs: three VMs come and go; the third lands on the
# physical GPUs the first one had. The scans go to SQLite and stdout, then the
# history shows which GPUs moved between machines.
run: $(CORE_STAMP)
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
	scripts/image/ensure-tools.sh
	PYTHON=$(PYTHON) scripts/core-venv.sh .venv-core
	PYTHON=$(PYTHON) scripts/floor-venv.sh .venv-floor
	scripts/test-servers.sh start
	$(MAKE) --no-print-directory image REPRO_CHECK=1 \
		PUSH=$$(sed -n 's/^GPUFLEET_TEST_REGISTRY=//p' .testservers/env)/gpufleet \
		|| { scripts/test-servers.sh stop; exit 1; }
	$(BIN)/pytest -q; rc=$$?; \
	echo "== the same client tests at the declared floors (.venv-floor)"; \
	.venv-floor/bin/pytest -q -p no:cacheprovider $(FLOOR_TESTS); floor=$$?; \
	scripts/test-servers.sh stop; [ $$rc = 0 ] && exit $$floor; exit $$rc

# The peers the benchmarks compare against (nvitop-exporter) come from the bench extra.
$(VENV)/.installed-bench: $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[all,dev,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	@set -e; for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

# The container image (docs/image.md): a local Debian base from mmdebstrap, the wheels
# resolved outside, buildah without a daemon. PUSH=host:port/repo also pushes it there;
# REPRO_CHECK=1 builds twice and records whether the layers came out the same.
PUSH ?=
REPRO_CHECK ?=
image: $(STAMP)
	scripts/image/ensure-tools.sh
	PYTHON=$(BIN)/python PUSH=$(PUSH) REPRO_CHECK=$(REPRO_CHECK) scripts/image/build.sh

proto: $(STAMP)
	scripts/gen-proto.sh

# One `kubectl apply -f dist/install-<feature>.yaml` per overlay, tagged with the
# package version; a test fails while dist/ or docs/deploy.md is stale.
DEFAULT_IMAGE := ghcr.io/gpufleet/gpufleet
IMAGE ?= $(DEFAULT_IMAGE)
manifests: $(STAMP)
	scripts/ensure-kubectl.sh
	IMAGE=$(IMAGE) $(BIN)/python scripts/render-manifests.py --out dist
	$(BIN)/python scripts/deploy-docs.py

clean:
	rm -rf $(VENV) .venv-core .venv-floor $(RUN_DIR) .pytest_cache .mypy_cache .ruff_cache build/image
