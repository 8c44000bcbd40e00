# `make demo` and `make test` work on a fresh clone: they create .venv, install
# torch==2.13.0 first (the CPU build; an unpinned torch pulls a multi-GB CUDA
# build), then slimfuse with its dev and nlp extras. The install is skipped while the
# stamp, keyed on the dependency files, is current.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)

# Run-time caches stay inside the project, never in $HOME.
export MPLCONFIGDIR            := $(CURDIR)/.cache/matplotlib
export XDG_CACHE_HOME          := $(CURDIR)/.cache/xdg
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-fast lint install clean bench-deps

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,nlp]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/slimfuse demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (the rule set in pyproject.toml) and mypy on the public API; CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Benchmark baselines (the `bench` extra), always without their dependencies: torchensemble
# would otherwise pull torchvision and replace the pinned torch.
bench-deps: $(STAMP)
	$(PY) -m pip install -q --no-deps torchensemble==0.2.0

clean:
	rm -rf runs .cache .pytest_cache build src/*.egg-info
