# The README's two commands: `make demo` (set up, then convert and sample the shipped model) and
# `make test` (set up, then lint and run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest workers of `make test`: CI has two cores; each worker runs torch on one thread (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: setup test lint format demo bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch lies on disk here; a bare `pip install torch` would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: setup
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The main job on the model shipped in the package: calibrate + convert it (T = 4), then sample a grid.
demo: setup
	$(BIN)/sdm-convert --output outputs/digits-snn --overwrite
	$(BIN)/sdm-sample --model outputs/digits-snn --num-images 64 --steps 20 --output outputs/digits-samples --overwrite
	@echo "Samples: outputs/digits-samples/grid.png"
