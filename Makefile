# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests whose code is backend-agnostic run a second time under JAX.
BACKEND_AGNOSTIC_TESTS = $(shell cat tests/backend_agnostic.txt 2>/dev/null)

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-tf test-jax lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits_triplet.py

test: test-tf test-jax

test-tf: $(STAMP)
	KERAS_BACKEND=tensorflow $(PY) -m pytest

test-jax: $(STAMP)
	KERAS_BACKEND=jax $(PY) -m pytest $(BACKEND_AGNOSTIC_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_losses.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
