# Two commands do all the set-up: `make demo` and `make test`.
# torch is installed first, pinned, so that no dependency pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lossguard-installed
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test lint bench browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf demo-run  # a fresh run each time, not one appended to the last
	$(BIN)/python examples/tiny_cpu.py

# Debian's chromium for the HTML-report browser test (needs root; skipped quietly otherwise).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "note: chromium not installed; the browser test will be skipped outside CI"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lossguard tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) demo-run test-artifacts .pytest_cache
