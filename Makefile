# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install onnxforge with its dependencies first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact CPU build of PyTorch, installed before the project so that nothing pulls the
# newest torch with several GB of CUDA packages.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev,hf,ray]'
	touch $(STAMP)

demo: install
	$(BIN)/onnxforge demo --out demo-out

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/fusion.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache .hypothesis
