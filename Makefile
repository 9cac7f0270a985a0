PYTHON ?= python3

.PHONY: install test lint bench train

install:  ## CPU torch from the local wheel cache or PyPI, then the package with test tools
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,eval]"

test:
	$(PYTHON) -m pytest -n 2

lint:
	$(PYTHON) -m ruff check moe_sparsify tests scripts
	$(PYTHON) -m ruff format --check moe_sparsify tests scripts

bench:
	$(PYTHON) scripts/bench_search.py

train:  ## retrain the bundled model (~12 min on 2 cores)
	$(PYTHON) scripts/train_tiny_moe.py
