# Quickstart targets. `make run` and `make test` each set up the virtual environment first.
# TORCH_SPEC picks the PyTorch build: the default is the CPU wheel that lies on this
# machine's disk; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0" with their CUDA index.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run smoke test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: setup          ## the main job (for now: the core demo, FM then CAFM on digits)
	$(VENV)/bin/cafm-demo $(ARGS)

smoke: setup
	$(VENV)/bin/cafm-demo --profile smoke $(ARGS)

test: setup         ## the test suite CI runs
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(PY) bench/bench_core.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
