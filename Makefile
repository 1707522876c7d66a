# ttt-speech: every target sets itself up; a fresh clone needs only `make quickstart` / `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# moshi compiles some functions on first call otherwise (~14 s each on CPU)
export NO_TORCH_COMPILE ?= 1

.PHONY: setup apply-patches check-patches export-patches upstream-status quickstart quickstart-llama test lint \
	samples system-deps eval-librilight

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"ttt-speech needs Python 3.11, .venv has {sys.version.split()[0]}; set PYTHON=python3.11"'
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

apply-patches: $(STAMP)
	$(PY) scripts/upstream.py apply

check-patches: $(STAMP)
	$(PY) scripts/upstream.py check

# NAME=moshi to export one upstream; default: every checkout present
export-patches: $(STAMP)
	$(PY) scripts/upstream.py export $(NAME)

upstream-status: $(STAMP)
	$(PY) scripts/upstream.py status

# espeak-ng (and sox) from Debian, only when missing; needs root
system-deps:
	bash scripts/install_system_deps.sh

# the sample set (synthesised speech, alignments, tokenizer) in data/samples; a no-op when up to date
samples: $(STAMP)
	@command -v espeak-ng >/dev/null || bash scripts/install_system_deps.sh
	$(PY) scripts/make_samples.py --out data/samples

quickstart: apply-patches samples
	$(VENV)/bin/ttt-speech quickstart

# distil a tiny random Llama (LLaMA-Omni's patched class is trained by the tests when LLAMA_OMNI_SRC is set) into
# TTT-Linear with a resume; prints the path of runs/quickstart-llama/summary.json. About a minute on 2 CPU cores.
quickstart-llama: apply-patches
	$(VENV)/bin/ttt-speech quickstart --llama --out runs/quickstart-llama

# NLL by position past the attention window. Defaults: the quickstart's base and TTT models on the sample audiobook.
# Real use: make eval-librilight CHECKPOINTS="base=/path/moshi.safetensors ttt=runs/x/export" \
#   MANIFEST=/data/librilight_long/long.jsonl TOKENIZER=/path/tokenizer.model MIMI=/path/mimi.safetensors
CHECKPOINTS ?= base=runs/quickstart/base/export ttt=runs/quickstart/ttt/export
MANIFEST ?= data/samples/audiobook.jsonl
TOKENIZER ?= data/samples/tokenizer.model
MIMI ?= tiny-random
EVAL_OUT ?= runs/eval-librilight
EVAL_ARGS ?=
eval-librilight: apply-patches samples
	$(VENV)/bin/ttt-speech eval librilight $(foreach c,$(CHECKPOINTS),--checkpoint $(c)) --manifest $(MANIFEST) \
	  --tokenizer $(TOKENIZER) --mimi $(MIMI) --out $(EVAL_OUT) $(EVAL_ARGS)

test: apply-patches samples
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check overlay scripts tests
