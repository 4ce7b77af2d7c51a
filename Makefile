# Two commands on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install run test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first. Where pip is configured with a local CPU wheel (these machines) that is
# what it gets; from PyPI alone Linux torch is the multi-GB CUDA build (it runs on CPU too).
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU-only wheel from PyTorch's index.
TORCH_INDEX ?=
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.13.0" || $(PIP) install -q "torch>=2.4"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: every site generates (or loads) its data, then `flwr run .` federates them.
# Pass options through RUN_ARGS, e.g. make run RUN_ARGS="--set num-server-rounds=5".
run: $(STAMP)
	$(PY) scripts/dataset_summary.py scenarios/federations/default.yaml
	$(PY) scripts/run_federation.py $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .flwr .pytest_cache
