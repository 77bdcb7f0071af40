# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.13.0
# Where torch comes from: PyPI's Linux wheel is a CUDA build (and runs on CPU-only machines
# too); a cluster whose driver needs another CUDA sets e.g.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126.
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed
# DeepSpeed compiles no op at install (its ops this project uses are plain PyTorch), so a
# cluster without nvcc or a compiler installs it too.
export DS_BUILD_OPS := 0

.PHONY: install test demo bench clean

install: $(STAMP)

# torch first (the CPU wheel here, a CUDA build on GPU machines), then the rest without build
# isolation because DeepSpeed's source build imports torch; finally the project itself, editable.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install --quiet --no-build-isolation -r requirements.txt
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check src data_prep tests benchmarks
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m sparse_moe.demo

bench: install
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
