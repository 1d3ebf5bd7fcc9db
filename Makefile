# The README's commands. Each target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Tests and the benchmarks read datasets from here (see ../shared/data/README.md); users set their own.
export ORDERLAB_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch 2.13.0 when no torch is present (an unpinned request pulls CUDA packages)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# grab-sampler is the reference implementation the parity tests compare against; its torch-sparse
	# requirement is only for a projection orderlab does not use, hence --no-deps
	$(BIN)/pip install -q overrides absl-py scikit-learn
	$(BIN)/pip install -q --no-deps grab-sampler==0.1.3
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/orderlab sweep configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q tests

# the benchmarks of benchmarks/, in order, each printing markdown tables (README "Performance");
# `make bench BENCH_ARGS=--quick` for smaller sizes
BENCH_ARGS ?=
bench: setup
	$(BIN)/python benchmarks/server_throughput.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/blocked_balance.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/epoch_overhead.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/allreduce_contention.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/sketch_quality.py $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check platform tasks tests benchmarks
	$(BIN)/ruff format --check platform tasks tests benchmarks

clean:
	rm -rf $(VENV) results
