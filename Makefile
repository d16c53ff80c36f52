# llmcomm — one environment, two commands (README "Quick start"):
#
#   make book    create .venv if missing, install the pinned stack, execute every chapter (experiments
#                included) in place, build the HTML book into book/_build/html
#   make test    same environment; unit tests + nbval over the chapters + an offline book build
#
# Other targets: make help | test-fast | install | execute [NB=book/CHAPTER.ipynb] | html | data | clean | distclean
# Variables you may set: PYTHON (interpreter that creates the venv), VENV (e.g. VENV=$CONDA_PREFIX to use
# an active conda env), INSTALLER (uv or pip), NB, EXEC_TIMEOUT, PYTEST_ARGS, DATA_STEPS.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# Install step reruns only when one of these changes (stamp file inside the venv).
REQS   := requirements/base.txt requirements/book.txt requirements/test.txt pyproject.toml
STAMP  := $(VENV)/.llmcomm-installed

# Chapters, in _toc.yml order (plain make, no YAML parser needed before the venv exists).
TOC_FILES := $(shell sed -n 's/^[[:space:]-]*file:[[:space:]]*\([^[:space:]#]*\).*/\1/p' book/_toc.yml)
NOTEBOOKS := $(foreach f,$(TOC_FILES),$(wildcard book/$(f).ipynb))
NB ?= $(NOTEBOOKS)

# Seconds one notebook cell may run (nbconvert and nbval alike); experiments are in cells.
EXEC_TIMEOUT ?= 1800
PYTEST_ARGS ?=

# Vendored MathJax (see book/_config.yml): copied from the pinned PyPI package into a gitignored folder.
MATHJAX_DIR := book/_static_extra/_static/mathjax
MATHJAX     := $(MATHJAX_DIR)/tex-chtml.js

# ---- environment of every recipe -----------------------------------------------------------------------
# No NVIDIA GPU answering `nvidia-smi -L` -> DeepSpeed's CPU accelerator (silences its detection warning).
# A DS_ACCELERATOR set by the caller wins; on a GPU node it stays unset so DeepSpeed picks CUDA.
ifeq ($(origin DS_ACCELERATOR),undefined)
  ifneq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),gpu)
    export DS_ACCELERATOR := cpu
  endif
endif
# DeepSpeed JIT-compiles its shared-memory comm op once (~30 s); keep the build in the checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0
# The venv first on PATH: `python`, `jupyter`, and the python3 kernel all resolve to the venv's.
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(BIN)):$(PATH)
# Kernel specs: the venv's (sys-prefix) spec wins over a user-level one in ~/.local/share/jupyter.
export JUPYTER_PREFER_ENV_PATH := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1
export TOKENIZERS_PARALLELISM := false
# No progress bars from the library while chapters execute or nbval re-runs them: a bar would be saved into (or
# compared with) the committed outputs. Interactive use keeps them (llmcomm.measure.launch.progress_enabled).
export LLMCOMM_PROGRESS ?= 0
# Models are built from configs with random weights: nothing is downloaded. Fail fast if something tries.
export HF_HUB_OFFLINE ?= 1

.PHONY: help install book execute html test test-fast data gpu-fits clean distclean

help:
	@sed -n '2,10p' Makefile | sed 's/^# \{0,1\}//'

# ---- environment ---------------------------------------------------------------------------------------
$(PY):
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else \
	  "llmcomm: $(PYTHON) is Python %d.%d; the pinned stack needs Python >= 3.11 (numpy 2.4, pandas 3 and " \
	  "transformers 5.24 have no 3.10 builds). Run e.g. `make book PYTHON=python3.11`." % v[:2])'
	$(PYTHON) -m venv $(VENV)

# Installer: uv (default; pinned, bootstrapped into the venv by pip) or pip (INSTALLER=pip: the same pins, the same
# result, about 3x slower on 2 cores: pip 23 fetches index pages one by one and compiles bytecode serially).
INSTALLER  ?= uv
UV_VERSION ?= 0.13.9
# uv reads neither pip's configuration nor PIP_* variables: hand it the wheel folders pip is configured with
# (PIP_FIND_LINKS or find-links in a pip.conf: where a machine keeps its CPU build of torch) and PIP_EXTRA_INDEX_URL
# (README, "CPU machines"). torch==X then resolves as under pip: X+cpu where such a source offers it (a local version
# sorts above the plain one), else the plain (CUDA) build.
FIND_LINKS = $(shell $(PY) -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p" | tr ' ' '\n' | sort -u)
UV_SOURCES = $(addprefix --find-links ,$(FIND_LINKS)) \
             $(if $(PIP_EXTRA_INDEX_URL),--index-strategy unsafe-best-match $(addprefix --extra-index-url ,$(PIP_EXTRA_INDEX_URL)))

$(STAMP): $(PY) $(REQS)
ifeq ($(INSTALLER),uv)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	@# --compile-bytecode: pip writes .pyc files at install, uv does not by default; without them (and with
	@# PYTHONDONTWRITEBYTECODE set) every rank and kernel recompiles what it imports (~19 s instead of ~7 s).
	$(BIN)/uv pip install --python $(PY) --compile-bytecode $(UV_SOURCES) \
	  -r requirements/book.txt -r requirements/test.txt -e .
else
	$(PY) -m pip install -r requirements/book.txt -r requirements/test.txt -e .
endif
	@# The notebooks' kernel `python3` = this environment's interpreter (absolute path in the spec).
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)"
	@touch $@

install: $(STAMP) $(MATHJAX)

$(MATHJAX): $(STAMP)
	@src="$$($(PY) -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("mathjax").submodule_search_locations[0], "static", "mathjax", "es5"))')"; \
	  test -f "$$src/tex-chtml.js" || { echo "MathJax es5 build not found at $$src" >&2; exit 1; }; \
	  rm -rf $(MATHJAX_DIR) && mkdir -p $(dir $(MATHJAX_DIR)) && cp -R "$$src" $(MATHJAX_DIR); \
	  echo "vendored MathJax: $$src -> $(MATHJAX_DIR)"
	@touch $@

# ---- the book ------------------------------------------------------------------------------------------
# Execute in place, then build with execution off: the HTML shows exactly the committed outputs
# (reasoning in book/_config.yml). One notebook: make execute NB=book/tp_derivation.ipynb
# LLMCOMM_SAVE=1: the chapters' sweeps write data/<machine>/ with provenance (llmcomm.compare.sweeps.save); under
# nbval (make test) it is unset, so re-running the notebooks never rewrites committed data.
execute: $(STAMP)
	@test -n "$(strip $(NB))" || { echo "no notebooks to execute" >&2; exit 1; }
	LLMCOMM_SAVE=1 python tools/execute_notebooks.py --timeout $(EXEC_TIMEOUT) $(NB)

# Build the HTML from the notebooks as committed (no execution). --all: every page is re-read, so -W
# sees the warnings of unchanged pages too.
html: $(STAMP) $(MATHJAX)
	jupyter-book build book --builder html --all -W -n --keep-going
	@echo "book: file://$(CURDIR)/book/_build/html/index.html"

book: $(STAMP) $(MATHJAX)
	$(MAKE) execute NB="$(NOTEBOOKS)"
	$(MAKE) html

# ---- tests ---------------------------------------------------------------------------------------------
# One pytest run: unit tests in tests/ plus nbval (strict) over every chapter, each re-executed in a fresh
# kernel of this environment and compared with its committed outputs (sanitised, tests/nbval_sanitize.cfg).
# Then the book is built offline from the committed outputs (-W: a broken page fails the tests).
# Every step runs; the target fails if any failed.
test: $(STAMP) $(MATHJAX)
	@mkdir -p .cache; rc=0; \
	python -m pytest tests $(NOTEBOOKS) \
	  --nbval --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg \
	  --nbval-cell-timeout=$(EXEC_TIMEOUT) \
	  --durations=15 -ra $(PYTEST_ARGS) || rc=$$?; \
	echo "== pytest exit status: $$rc"; \
	jupyter-book build book --builder html --all -W -n --keep-going >.cache/book-build.log 2>&1 \
	  && echo "== book build (-W -n): clean" \
	  || { echo "== book build (-W -n) FAILED:"; tail -n 40 .cache/book-build.log; rc=1; }; \
	exit $$rc

# The unit tests that start no rank and load no DeepSpeed op (tests not marked `slow`; tests/conftest.py fails a
# test that tries), no nbval, no book build: the loop while editing (< 1 min).
test-fast: $(STAMP)
	python -m pytest tests -m "not slow" -q --durations=5 $(PYTEST_ARGS)

# ---- data ----------------------------------------------------------------------------------------------
# Re-run the experiments whose results are committed under data/<machine>/ and that the chapters read but do
# not run themselves (the chapters' own sweeps run in `make book`). Each driver picks data/<machine>/ itself
# (LLMCOMM_MACHINE or a --machine option; see llmcomm.record) and writes a provenance sidecar (README).
# HOOK: one command per line; append new experiment drivers here (or: make data DATA_STEPS='...').
# Calibration of this machine (the time model's cpu-local preset): collectives microbenchmark, then
# `llmcomm validate-time`, which calibrates the machine first — the α-β fits of that microbenchmark, the CPU kernel
# model and host times (at the thread counts the runs use), the in-run factors and call latencies (calib-llama run
# as TP2, PP2 and 2x2) — written into data/calibration/cpu-local.json (a calibration is a result: it lives with the
# data, never in src/), then runs the time model's CPU validation (3 reruns of the latency sweep, every point 5
# times) into data/cpu-local/. On a GPU node only
# the microbenchmark runs (nccl), into data/<machine>/. The GPU kernel and NCCL fits to the public measurements
# (data/external/vidur) are machine-independent: `make gpu-fits` (~15 min). ~12 min on a quiet 2-core machine.
BENCH_ARGS ?= $(if $(filter cpu,$(DS_ACCELERATOR)),--backend shm gloo --max-bytes 16M --point-seconds 0.15 --ranks 2 $$([ $$(nproc) -ge 4 ] && echo 4 || true))
define DATA_STEPS
llmcomm bench-collectives --out data/$$(python -c 'from llmcomm.record import machine_id; print(machine_id())') $(BENCH_ARGS) --no-progress
if [ "$${DS_ACCELERATOR:-}" = cpu ]; then llmcomm validate-time --runs 3 --reps 5; fi
endef
data: $(STAMP)
	$(DATA_STEPS)

gpu-fits: $(STAMP)
	llmcomm calibrate --public-gpu

# ---- cleaning ------------------------------------------------------------------------------------------
clean:
	rm -rf book/_build book/_static_extra .pytest_cache .cache/book-build.log
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find book -name .ipynb_checkpoints -type d -prune -exec rm -rf {} +

# Also the environment and the compiled DeepSpeed op.
distclean: clean
	rm -rf $(VENV) .cache
