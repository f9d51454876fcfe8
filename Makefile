# vlmforge: `make export-all` builds the default matrix, `make test` runs the test suite.
# Every target that runs vlmforge creates the pinned virtual environment itself on a fresh machine.
#   make export-all                                      every cell, one after the other (Hydra basic launcher)
#   make export-all OVERRIDES="hydra/launcher=joblib hydra.launcher.n_jobs=2"   cells in parallel
#   make export-all MATRIX=smoke OVERRIDES=validate.chain_tokens=4              the two-cell smoke matrix
#   make export-all FORCE=1                              rebuild every stage (ignore <cache_dir>/stages)
#   make export-all OVERRIDES="hydra/launcher=ray"        cells as Ray tasks (a local Ray, or init.address=auto)
#   make cluster-check                                   (root) the smoke matrix on a one-node Slurm cluster here

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# No model hub at build or test time: the embedded fixtures are written offline.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONDONTWRITEBYTECODE := 1

MATRIX  ?= default
FORCE_FLAG := $(if $(FORCE),--force,)

.PHONY: help venv test test-quick export-all export repro-check bench train-fixtures cluster-check clean distclean compare-commits js-setup scale-check

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,genai,launchers,ray,slurm]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv from constraints.txt

# Node clients the tests drive (transformers.js, pinned by js/package-lock.json); `npm ci` again only when js/ changes.
JS_STAMP := js/node_modules/.installed
$(JS_STAMP): js/package.json js/package-lock.json
	@node -e 'process.exit(+process.versions.node.split(".")[0] < 18 ? 1 : 0)' 2>/dev/null && command -v npm >/dev/null || \
	  { echo "make js-setup: needs Node.js >= 18 and npm on PATH (tested with Node 20; e.g. apt-get install nodejs npm)" >&2; exit 2; }
	cd js && npm ci --ignore-scripts --no-audit --no-fund
	touch $(JS_STAMP)

js-setup: $(JS_STAMP)  ## install js/'s pinned Node packages (@huggingface/transformers 4.3.2) with npm ci

# pytest-xdist workers (one per CPU; TEST_WORKERS=0 runs in this process). The workers share one stage cache.
TEST_WORKERS ?= auto

test: $(STAMP) $(JS_STAMP)  ## run the whole test suite (CPU, tiny models, no network), the slow tests first
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

test-quick: $(STAMP) $(JS_STAMP)  ## the suite without the tests marked slow (whole builds through launchers, Ray)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not slow" $(PYTEST_ARGS)

export-all: $(STAMP)  ## build, validate and describe every cell of recipes/matrix/$(MATRIX).yaml (one Hydra multirun)
	$(VENV)/bin/vlmforge export-all --matrix $(MATRIX) $(FORCE_FLAG) $(OVERRIDES)

export: $(STAMP)  ## build one artifact set: make export OVERRIDES="model=tiny_qwen2_5_vl vision=large"
	$(VENV)/bin/vlmforge export $(FORCE_FLAG) $(OVERRIDES)

repro-check: $(STAMP)  ## build one recipe twice from scratch and compare byte for byte: make repro-check OVERRIDES=...
	$(PY) -m vlmforge.repro $(OVERRIDES)

bench: $(STAMP)  ## runtime benchmark (BENCH_ARGS passes options)
	$(PY) -m vlmforge.bench $(BENCH_ARGS)

cluster-check: $(STAMP)  ## as root: one-node Slurm cluster here, smoke matrix on it, scancel one job, re-run (scripts/cluster_check.sh)
	VENV=$(VENV) scripts/cluster_check.sh

scale-check: $(STAMP)  ## random-weight checkpoints at a real config, built at a few depths: make scale-check SCALE_ARGS="--layers 2,4"
	$(PY) scripts/scale_check.py $(SCALE_ARGS)

train-fixtures: $(STAMP)  ## retrain the trained tiny fixtures of every family
	$(PY) -m vlmforge.fixtures.train --family all

clean:  ## remove artifacts and caches, the stage cache in .work/stages included (keeps .venv)
	rm -rf artifacts/*/ .work .pytest_cache

distclean: clean  ## also remove the virtual environment and js/node_modules
	rm -rf $(VENV) js/node_modules

compare-commits: $(STAMP)  ## build MATRIX (default smoke) at commits A and B, compare every file byte for byte: make compare-commits A=d7af6ec B=HEAD
	$(PY) scripts/compare_commits.py $(A) $(B) --matrix $(if $(filter default,$(MATRIX)),smoke,$(MATRIX)) $(OVERRIDES)
