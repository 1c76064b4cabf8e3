# Quickstart targets. `make run` and `make test` each set up the virtual environment first.
# TORCH_SPEC picks the PyTorch build: the default is the CPU wheel that lies on this
# machine's disk; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0" with their CUDA index.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run smoke demo test unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: setup          ## the main job: the full pipeline on digits with embedded defaults
	$(VENV)/bin/cafm-pipeline run $(ARGS)

smoke: setup        ## the same pipeline stages with few steps
	$(VENV)/bin/cafm-pipeline run --profile smoke $(ARGS)

demo: setup         ## the core demo: cafm_core alone, no services
	$(VENV)/bin/cafm-demo $(ARGS)

test: setup         ## the test suite CI runs (unit + integration with real services on loopback)
	$(PY) -m pytest -q $(ARGS)

unit: setup
	$(PY) -m pytest -q tests/unit $(ARGS)

bench: setup
	$(PY) bench/bench_core.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
