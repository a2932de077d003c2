PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-all bench docs clean

setup: $(STAMP)

# torch==2.13.0 goes first so pip takes the CPU wheel on disk; everything after
# sees a satisfied `torch` requirement and never pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/embedpipe embed --config configs/local.yaml --overwrite
	$(VENV)/bin/embedpipe info output/sample --pairs 5 --pairs-in 'en.txt:*'  # the default model is English-trained

test: setup
	$(PY) -m pytest -m "not slow" tests

test-all: setup  # everything, the slow end-to-end, scale and cluster tests too (well over half an hour on 2 cores)
	$(PY) -m pytest tests

bench: setup
	$(PY) jobs/benchmark.py

docs: setup  # docs/reference.md, generated from the config classes and the CLI (a test checks it is current)
	$(PY) -m pipeline.reference docs/reference.md

clean:
	rm -rf $(VENV) output
