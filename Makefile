# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests whose code is backend-agnostic run again under JAX and under torch (CPU). Tests of
# code that runs in NumPy on the host whatever the backend (retrieval metrics, re-ranking,
# verification metrics) run once, under TensorFlow.
BACKEND_AGNOSTIC_TESTS = $(shell cat tests/backend_agnostic.txt 2>/dev/null)

export TF_CPP_MIN_LOG_LEVEL ?= 2
# pytest-xdist workers for the TensorFlow and JAX runs (both spend most of their time in
# single-threaded op dispatch, so two workers nearly halve them on 2 cores).
TEST_WORKERS ?= 2

.PHONY: demo test test-tf test-jax test-torch lint bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

DEMO_DIR ?= runs/demo

# The whole journey on the bundled glyphs (589 characters rendered from matplotlib's
# fonts; 353 trained on, 236 never seen): train, export, search, evaluate.
# The last command prints where every artefact is and the metrics table.
demo: $(STAMP)
	$(VENV)/bin/keras-dml train --loss triplet --epochs 2 --out $(DEMO_DIR)
	$(VENV)/bin/keras-dml export $(DEMO_DIR) --tflite int8
	$(VENV)/bin/keras-dml search $(DEMO_DIR) --query-index 0 -k 5
	$(VENV)/bin/keras-dml evaluate $(DEMO_DIR)

DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[docs]"
	touch $(DOCS_STAMP)

# API reference from the docstrings; --strict turns every warning into an error.
docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

test: test-tf test-jax test-torch

test-tf: $(STAMP)
	KERAS_BACKEND=tensorflow $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The JAX re-run spends most of its time compiling each test's small train step with XLA;
# LLVM's optimisation of that code buys nothing in a correctness test, so it is turned off
# (measured: the JAX files ran in 20-35% less time; BENCHMARKS.md "Test-suite time").
test-jax: $(STAMP)
	XLA_FLAGS="--xla_backend_optimization_level=0 $(XLA_FLAGS)" KERAS_BACKEND=jax $(PY) -m pytest -n $(TEST_WORKERS) $(BACKEND_AGNOSTIC_TESTS)

test-torch: $(STAMP)
	KERAS_BACKEND=torch $(PY) -m pytest $(BACKEND_AGNOSTIC_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_losses.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache site
