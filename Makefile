# The contract: `make test` and `make train` work on a fresh machine and set themselves up.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test lint train bench docs

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Installed once, again only when what the install builds from changes (the stamp is older):
# an editable install takes ~10 s, and the Python sources it links need no reinstall.
STAMP := $(VENV)/.installed
$(STAMP): $(BIN)/python pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
# torch==2.13.0 first when no torch is present: a bare `torch` requirement would pull a
# multi-GB CUDA build; with it installed, the project's `torch>=2.4` installs nothing more.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q setuptools wheel ninja
	# No build isolation: setup.py builds the native kernels (csrc/) against this torch.
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev,train,triton,hf,docs]"
	touch $@

setup: $(STAMP)

# tests/test_docs.py builds the docs site too (warnings as errors).
test: setup
	$(BIN)/ruff check fused_ce tests bench examples
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check fused_ce tests bench examples
	$(BIN)/ruff format --check fused_ce tests bench examples

train: setup
	$(BIN)/fused-ce train majority-bits --out runs/majority-bits
	$(BIN)/fused-ce train popcount --out runs/popcount

# Each case's name as it runs (-v), pytest-benchmark's own table left out (the report has the
# times and the bounds), the JSON where the report reads it, then the report: bound columns
# and goals. A subset: make bench BENCH_ARGS="-k popcount".
BENCH_OUT ?= out/bench
bench: setup
	mkdir -p $(BENCH_OUT)
	$(BIN)/python -m pytest bench --benchmark-only -v --benchmark-quiet \
		--benchmark-json=$(BENCH_OUT)/bench.json $(BENCH_ARGS)
	$(BIN)/python bench/report.py $(BENCH_OUT)/bench.json --out $(BENCH_OUT) --print

# The docs site: the pages of docs/ and the API reference from the docstrings (docs/conf.py),
# rebuilt from scratch (-E) with warnings as errors; open out/docs/index.html.
DOCS_OUT ?= out/docs
docs: setup
	$(BIN)/python -m sphinx -E -W --keep-going -q -b html docs $(DOCS_OUT)
	@echo "docs: $(DOCS_OUT)/index.html"
