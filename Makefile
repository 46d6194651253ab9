# `make demo` and `make test` do all set-up: a .venv with the pinned stack and this package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtprune-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

$(STAMP): requirements-dev.txt setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps lmms-eval==0.7.3
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: install
	$(PY) -m vtprune.evals.demo --out demo_out

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) -m vtprune.evals.bench --json bench_out/bench.json

clean:
	rm -rf $(VENV) demo_out bench_out build *.egg-info
