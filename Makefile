# The README's commands. Each target creates .venv on first use (`make test VENV=DIR` uses DIR instead).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Tests and the benchmarks read datasets from here (see ../shared/data/README.md); users set their own.
export ORDERLAB_DATA ?= $(abspath ../shared/data)
# The exact versions every install takes, build tools included; `make lock` refreshes it.
CONSTRAINTS := requirements/constraints.txt
PIP_INSTALL = $(BIN)/pip install -q --constraint $(CONSTRAINTS) --build-constraint $(CONSTRAINTS)

.PHONY: setup demo test bench lint lock clean device-check device-data

# what `orderlab` itself needs (the demo, the benchmarks)
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch 2.13.0 when no torch is present (an unpinned request pulls CUDA packages)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(PIP_INSTALL) -e .
	touch $@

# what the tests and lint need besides: pyproject.toml's test, search and tracking extras (listed here,
# not as a self-reference in `test`, which pip-compile would lock as `orderlab @ file://...`), and grab-sampler, the reference
# implementation the parity tests compare against; its torch-sparse requirement is only for a
# projection orderlab does not use, hence --no-deps (the extra has the packages it imports)
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e ".[test,search,tracking]"
	$(BIN)/pip install -q --no-deps grab-sampler==0.1.3
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/orderlab sweep configs/demo.yaml

test: $(VENV)/.installed-test
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
	$(BIN)/python benchmarks/backends.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/herding_vs_workers.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/sampler_overhead.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/results_scale.py $(BENCH_ARGS)

# benchmarks/device_check.py here (no GPU: its CUDA parts skipped); device-data fills .device-data/ for
# the GPU machine (docs/performance.md, "GPU", has the command to run there)
device-check: setup
	$(BIN)/python benchmarks/device_check.py --out results/device-check $(BENCH_ARGS)

device-data: setup
	$(BIN)/python benchmarks/device_check.py --prepare .device-data

lint: $(VENV)/.installed-test
	$(BIN)/ruff check platform tasks tests benchmarks examples
	$(BIN)/ruff format --check platform tasks tests benchmarks examples
	$(BIN)/mypy

# Re-resolve $(CONSTRAINTS) from pyproject.toml's ranges with pip-tools in a throwaway venv: the newest
# versions that fit (`make lock LOCK_ARGS=` keeps the pins that still fit). Then `make test` and commit.
LOCK_ARGS ?= --upgrade
lock:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && $(PYTHON) -m venv "$$tmp" && \
	"$$tmp/bin/pip" install -q pip-tools==7.6.2 && \
	CUSTOM_COMPILE_COMMAND="make lock" "$$tmp/bin/pip-compile" --quiet $(LOCK_ARGS) --extra test --extra search --extra tracking \
		--strip-extras --all-build-deps --allow-unsafe --no-emit-index-url --no-emit-find-links \
		--output-file $(CONSTRAINTS) pyproject.toml
	# torch by its plain version: the CPU wheel (2.13.0+cpu) that the torch step installs satisfies it
	sed -i 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' $(CONSTRAINTS)

clean:
	rm -rf $(VENV) results
