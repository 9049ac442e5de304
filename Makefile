# Quick start: `make demo` runs the main job on this machine's default device; `make test` runs the CPU test suite.
# Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint gpu-check clean

$(STAMP): pyproject.toml requirements-pins.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-pins.txt
	$(PY) -m pip install -q -c requirements-pins.txt -e ".[dev,bench,hydra,examples,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m triformers.demo
	$(PY) examples/microGPT.py --demo

# TRITON_INTERPRET=1 runs every Triton kernel on CPU tensors, so the suite covers the kernels without a GPU.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples

clean:
	rm -rf $(VENV) build src/*.egg-info
