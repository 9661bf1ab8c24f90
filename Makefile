# The README's two commands: `make test` and `make bench`. Each first sets up .venv:
# reuses an importable torch (system site packages) or installs $(TORCH_SPEC), then installs
# fastmeta in editable mode so the C++ build sees that torch.
PYTHON ?= python3
TORCH_SPEC ?= torch
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastmeta-installed
SOURCES := $(wildcard setup.py pyproject.toml csrc/*.cpp csrc/*.h csrc/cuda/*)

.PHONY: test bench venv clean gpu-check

venv: $(STAMP)

$(VENV)/bin/python:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "[fastmeta] reusing the torch importable by $(PYTHON)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PIP) install -q --upgrade pip setuptools wheel
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  echo "[fastmeta] installing $(TORCH_SPEC)"; \
	  $(PIP) install -q "$(TORCH_SPEC)"; \
	fi
	$(PIP) install -q ninja numpy pytest pytest-benchmark "triton==3.6.0"
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@$(PY) -m fastmeta.info --short
	@touch $(STAMP)

test: $(STAMP)
	FASTMETA_REQUIRE_CPP=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m fastmeta.bench

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info fastmeta/_C*.so fastmeta/_build_status.json
