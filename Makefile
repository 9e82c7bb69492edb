# Two entry points a newcomer needs: `make serve` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup serve test test-native-off test-cluster test-slow test-all bench wheel clean

# The editable install also generates the gRPC stubs from proto/ (setup.py), so it reruns when they change.
$(STAMP): pyproject.toml setup.py $(wildcard proto/*/*/*.proto)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU wheel first and pinned, so nothing pulls the multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(OFFLINE) $(BIN)/adapterserve serve $(ARGS)

test: setup
	$(OFFLINE) $(BIN)/python -m pytest -q

# The tests that exercise native kernels, again with every portable path forced.
test-native-off: setup
	$(OFFLINE) ADAPTERSERVE_NATIVE=off $(BIN)/python -m pytest -q -m native

# The Ray Serve cluster on a real local Ray cluster (about 3 minutes; CI runs it after the default suite).
test-cluster: setup
	$(OFFLINE) $(BIN)/python -m pytest -q -m cluster

# Tests marked slow (the 20 kill -9 trials against a real server, about 2 minutes); CI runs them too.
test-slow: setup
	$(OFFLINE) $(BIN)/python -m pytest -q -m slow

test-all: setup
	$(OFFLINE) $(BIN)/python -m pytest -q -m ''

bench: setup
	$(OFFLINE) $(BIN)/python -m adapterserve.loadtest.runtime_bench

wheel: setup
	$(BIN)/pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
