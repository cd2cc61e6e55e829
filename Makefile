# Two commands do all the set-up on a fresh machine (see README):
#   make serve   create .venv, install swan-serve, serve the bundled demo model on :8000
#   make test    create .venv, install swan-serve with dev tools, lint, run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: serve test lint install install-dev clean

# Re-install only when the package metadata changed.
$(VENV)/.stamp-install: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-install
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.stamp-install
install-dev: $(VENV)/.stamp-dev

serve: install
	$(BIN)/swan-serve $(ARGS)

lint: install-dev
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
