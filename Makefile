# aqimodels: `make run` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY ?= true
PROTO_FILES := protos/aqimodels/api/training/v1/worker.proto protos/aqimodels/api/registry/v1/registry.proto
GENERATED := $(foreach p,$(PROTO_FILES),$(p:.proto=_pb2.py) $(p:.proto=_pb2_grpc.py) $(p:.proto=_pb2.pyi) $(p:.proto=_pb2_grpc.pyi))

.PHONY: help install run worker demo test test-fast protos check-protos lint typecheck bench clean relink bytecode

help:
	@echo "make run     - set up .venv and start the registry with a local training worker"
	@echo "make test    - set up .venv and run the whole suite (check-protos included)"
	@echo "make demo    - retrain all four models on synthetic data, compare, promote, print status"
	@echo "make bench   - run the benchmarks, write bench/results/*.json and BENCHMARKS.md"

# The venv is rebuilt when the project's dependency files change.
$(STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, by exact pin: pip takes the CPU wheel on this machine's disk.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=strict
	$(BIN)/pip check
	$(MAKE) -s bytecode
	@touch $(STAMP)

install: $(STAMP)

# The registry in the foreground, the dashboard beside it (stopped with it).
run: $(STAMP)
	@$(BIN)/aqimodels --target "$${AQIMODELS_TARGET:-127.0.0.1:$${AQIMODELS_PORT:-50051}}" dashboard & dashboard=$$!; trap 'kill $$dashboard 2>/dev/null' EXIT; \
	  echo "dashboard: http://127.0.0.1:$${AQIMODELS_DASHBOARD_PORT:-8080}/ (registry $${AQIMODELS_TARGET:-127.0.0.1:$${AQIMODELS_PORT:-50051}})"; \
	  $(BIN)/aqimodels serve

worker: $(STAMP)
	$(BIN)/aqimodels worker

demo: $(STAMP)
	$(BIN)/python -m aqimodels.client.demo

protos: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -Iprotos \
	  --python_out=protos --grpc_python_out=protos --mypy_out=protos --mypy_grpc_out=protos \
	  $(PROTO_FILES)

# Deletes the generated code, regenerates it and fails if anything differs from git.
check-protos: $(STAMP)
	rm -f $(GENERATED)
	$(MAKE) -s protos
	@if [ -n "$$(git status --porcelain -- protos)" ]; then \
	  echo "generated code is out of sync with the protos (run 'make protos' and commit):"; \
	  git status --porcelain -- protos; exit 1; fi
	@echo "protos: generated code in sync"

# ruff and mypy first: a finding fails the build before the suite runs.
test: $(STAMP) check-protos lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -x

lint: $(STAMP)
	$(BIN)/ruff check server client training process tests bench

typecheck: $(STAMP)
	$(BIN)/mypy server client training process

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf build .pytest_cache mlruns

# Strict editable installs link file by file: a new module needs a relink (6 s, no downloads).
relink:
	$(BIN)/pip install -q --no-deps -e . --config-settings editable_mode=strict 2>&1 | grep -v -e ignored -e '^ ' || true
	$(MAKE) -s bytecode

# Our modules' bytecode, written once: with PYTHONDONTWRITEBYTECODE set (as on this machine and
# in most images) every start would compile them again, a few hundred ms of the registry's start.
bytecode:
	$(BIN)/python -m compileall -q build
