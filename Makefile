# Two commands for a fresh machine (Python 3.11+, make, bash):
#   make serve   installs what is needed and starts the server with embedded defaults
#   make test    installs what is needed (venv, pip packages, Debian ffmpeg) and runs every test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test deps system-deps clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

deps: $(STAMP)

system-deps:
	@bash tests/install-system-deps.sh

serve: deps
	$(VENV)/bin/mediaserver serve

test: deps system-deps
	$(PY) -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV)
