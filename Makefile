# Two commands on a fresh machine:
#   make run    create .venv, install, train C2AL on the embedded MovieLens-100k
#   make test   create .venv, install, run the test suite
# (make test-fast leaves out the tests marked slow, for the edit loop)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_ARGS ?= --aux-cohorts

.PHONY: install run test test-fast bench minority-ne federated-bench flower-engine clean

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	@echo ">> creating $(VENV) and installing the pinned CPU dependency set"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q "flwr[simulation]==1.41.*" "torch==2.13.0"
	@touch $@

install: $(STAMP)

run: $(STAMP)
	@echo ">> python train.py $(RUN_ARGS)   (C2AL on MovieLens-100k, read from the recbole wheel; see README)"
	$(BIN)/python train.py $(RUN_ARGS)

test: $(STAMP)
	@echo ">> ruff check (ruff.toml), then pytest: the suite and every docstring example"
	$(BIN)/ruff check --no-cache .
	$(BIN)/python -m pytest -q --doctest-modules c2al models cohorts tests

test-fast: $(STAMP)
	@echo ">> ruff, then pytest -m 'not slow': the edit loop, without the tests that start processes or run whole jobs (make test runs them all)"
	$(BIN)/ruff check --no-cache .
	$(BIN)/python -m pytest -q -m "not slow" --doctest-modules c2al models cohorts tests

bench: $(STAMP)
	@echo ">> benchmarks/throughput.py (installs benchmarks/requirements.txt with --no-deps; torch stays pinned)"
	$(BIN)/pip install -q --no-deps -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/throughput.py $(BENCH_ARGS)

minority-ne: $(STAMP)
	@echo ">> benchmarks/minority_ne.py $(MINORITY_ARGS)   (baseline vs C2AL and its controls, 5 seeds; see README)"
	$(BIN)/python benchmarks/minority_ne.py $(MINORITY_ARGS)

federated-bench: $(STAMP)
	@echo ">> benchmarks/federated.py $(FEDERATED_ARGS)   (Ning et al., FedRecGEL and RF^2 reproduced, 3 seeds; see README)"
	$(BIN)/python benchmarks/federated.py $(FEDERATED_ARGS)

flower-engine: $(STAMP)
	@echo ">> benchmarks/flower_engine.py $(FLOWER_ARGS)   (Flower engine vs in-process engine wall time, 5 rounds; see README)"
	$(BIN)/python benchmarks/flower_engine.py $(FLOWER_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
