# rlft: `make demo` runs the built-in tiny pipeline, `make test` runs the tests.
# Both set everything up on a fresh machine (a venv in .venv, torch CPU build if missing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rlft-installed
# CI=true runs everything, slow end-to-end runs included; locally the slow marks are skipped.
ifeq ($(CI),true)
PYTEST_MARKS ?=
# the randomized reliability tests run N=20 trials in CI (5 locally)
export RLFT_RELIABILITY_N ?= 20
# the kill -9 of one torchrun rank: 20 trials in CI (both ranks, after step 1 or 2, random delays), 1 locally
export RLFT_KILL_TRIALS ?= 20
# the slowest tests, to keep the whole run within its budget
PYTEST_ARGS ?= --durations=25
else
PYTEST_MARKS ?= -m "not slow"
endif
# the tests run in parallel (pytest-xdist), one worker per core up to 4 (most tests use one thread);
# a test file stays on one worker, so its module-scoped runs are made once. TEST_WORKERS=0: serial.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)
PYTEST_PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: setup demo test test-all lint docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is a range in pyproject.toml; install the CPU build first when it is missing,
	# so pip does not pull a multi-GB CUDA build as a dependency.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# the R1 pipeline on the built-in tiny model: cold start, GRPO, rejection sampling, retrain,
# distillation, eval; prints the per-stage table (also saved as runs/tiny-r1/results.md)
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/rlft run recipes/tiny-r1.yaml

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_MARKS) $(PYTEST_ARGS)

test-all: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check rlft tests benchmarks
	$(BIN)/pyright -p pyproject.toml

docs: setup
	$(BIN)/python -m rlft.recipe.docgen > docs/recipe-reference.md

clean:
	rm -rf runs .pytest_cache
