# Quickstart targets. `make run` and `make test` each set up the virtual environment first.
# TORCH_SPEC picks the PyTorch build: the default is the CPU wheel that lies on this
# machine's disk; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0" with their CUDA index.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup lock run smoke demo test unit bench clean browser stack-up stack-down stack-status deploy e2e ui

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

lock: setup         ## regenerate constraints.txt (the exact versions setup installs) from the virtual environment
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -E '^(torch|triton)==|^nvidia-'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

run: setup          ## the main job: the full pipeline on digits with embedded defaults
	$(VENV)/bin/cafm-pipeline run $(ARGS)

smoke: setup        ## the same pipeline stages with few steps
	$(VENV)/bin/cafm-pipeline run --profile smoke $(ARGS)

ui: setup           ## the MLflow UI on the default tracking store (MLFLOW_TRACKING_URI, else outputs/mlflow.db), 127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/outputs/mlflow.db}" --host 127.0.0.1 $(ARGS)

demo: setup         ## the core demo: cafm_core alone, no services
	$(VENV)/bin/cafm-demo $(ARGS)

test: setup browser ## the test suite CI runs (unit + integration with real services on loopback)
	$(PY) -m pytest -q -rs --durations=20 $(ARGS)

e2e: setup browser  ## the team stack end to end: stack, deployments, worker runs, Prefect UI in headless Chromium
	$(PY) -m pytest -q -rs -s tests/integration/test_team_stack.py $(ARGS)

# Headless Chromium for the Prefect UI test: the Debian packages, installed once (root or sudo).
SUDO ?= $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "chromium: installed"; \
	else $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver \
	  || echo "warning: could not install chromium/chromium-driver; the Prefect UI test will be skipped and say why"; fi

stack-up: setup     ## the local team stack on 127.0.0.1 (docs/operations.md)
	$(PY) -m infra.stack up

stack-status: setup
	$(PY) -m infra.stack status

deploy: setup       ## preflight checks, then `prefect deploy --all` against the stack
	$(PY) -m infra.stack deploy

stack-down: setup
	$(PY) -m infra.stack down

unit: setup
	$(PY) -m pytest -q tests/unit $(ARGS)

bench: setup
	$(PY) bench/bench_core.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
