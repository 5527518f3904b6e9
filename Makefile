# Two commands do everything on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EFFNET := $(VENV)/bin/effnet
STAMP := $(VENV)/.installed
# Debian packages the tests and load tests use: real data and a real Prometheus server.
DEBS := dataset-fashion-mnist prometheus

.PHONY: setup system-deps test models bench serve clean help

help:
	@echo "make serve   set up, then serve the default models on 127.0.0.1:3000"
	@echo "make test    set up, then run the test suite"
	@echo "make models  print the variant table (parameters, MACs, the slides' figures)"
	@echo "make bench   time the main variants offline and record the figures in benchmarks/"

setup: $(STAMP) system-deps

# Re-installs only when pyproject.toml changed; torch/torchvision come from this machine's disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(STAMP)

system-deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "warning: missing Debian packages ($$missing); run 'sudo apt-get install $$missing'" >&2; \
	  fi; \
	fi

test: setup
	$(PY) -m pytest

models: setup
	$(EFFNET) models

bench: setup
	$(EFFNET) bench --record benchmarks/bench-$$(date -u +%Y%m%d-%H%M).json

# Fills the default store if empty (`checkpoints`), then serves on 127.0.0.1:3000 (prints example curls).
serve: setup checkpoints
	$(EFFNET) serve

clean:
	rm -rf $(VENV) .pytest_cache
