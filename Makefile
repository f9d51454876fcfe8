# vlmforge: `make export-all` builds the default matrix, `make test` runs the test suite.
# Both create the pinned virtual environment themselves on a fresh machine.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# No model hub at build or test time: the embedded fixtures are written offline.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help venv test export-all export clean distclean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,genai,launchers]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv from constraints.txt

test: $(STAMP)  ## run the test suite (CPU, tiny models, no network)
	$(PY) -m pytest -q $(PYTEST_ARGS)

export-all: $(STAMP)  ## build, validate and describe every cell of recipes/matrix/default.yaml
	$(VENV)/bin/vlmforge export-all $(OVERRIDES)

export: $(STAMP)  ## build one artifact set: make export OVERRIDES="model=tiny_qwen2_5_vl vision=large"
	$(VENV)/bin/vlmforge export $(OVERRIDES)

clean:  ## remove artifacts and caches (keeps .venv)
	rm -rf artifacts/*/ .work .pytest_cache

distclean: clean  ## also remove the virtual environment
	rm -rf $(VENV)
