# Two commands do everything on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EFFNET := $(VENV)/bin/effnet
STAMP := $(VENV)/.installed
# Debian packages the tests and load tests use: real data, a real Prometheus server, and wrk (the
# serving benchmark's load generator: C, a tenth of the CPU a Python generator takes from the server).
# kubernetes-client: kubectl, whose kustomize renders deploy/kubernetes/ offline for tests/deploy; left out
# where a kubectl is installed already (another package's /usr/bin/kubectl, which dpkg would refuse to replace).
DEBS := dataset-fashion-mnist prometheus wrk postgresql $(if $(wildcard /usr/bin/kubectl),,kubernetes-client)

.PHONY: setup system-deps test test-fast test-long models bench serve clean help checkpoints train-full loadtest engines chaos soak clients multihost

help:
	@echo "make serve   set up, then serve the default models on 127.0.0.1:3000"
	@echo "make test    set up, check the import layers (.importlinter), then run every test, servers included"
	@echo "make test-fast  the same without the tests marked server or slow (real servers and other processes, runs over about 30 s)"
	@echo "make multihost  a gateway and workers in network namespaces of their own: answers over real TCP, one host's failure"
	@echo "make test-long  the whole runs of long features (distributed Locust), which make test covers in parts"
	@echo "make checkpoints  fill the model store: Lite0 ImageNet + b0/mec/compact on Fashion-MNIST (quick recipe, side by side, ~17 min)"
	@echo "make engines      export, verify and choose each served variant's engine as its worker will (~5 min the first time)"
	@echo "make train-full   the full recipe on Fashion-MNIST (VARIANT=b0 NPROC=1)"
	@echo "make models  print the variant table (parameters, MACs, the slides' figures)"
	@echo "make bench   time the main variants offline; the figures go to benchmarks/results/<date>-<host>/"
	@echo "make loadtest  Locust + Prometheus against the served variants, splits, an experiment and the budget and cascade routes; reports/<run>/ (<= 15 min)"
	@echo "make chaos   kills, hangs, SIGTERM, slow clients, big uploads, a damaged store under load; reports/chaos-<run>/ (<= 10 min)"
	@echo "make soak    the service at half its capacity for 1 h (SOAK_ARGS=\"--duration 30m\"); RSS/fd/thread growth per process"

setup: $(STAMP) system-deps

# The Open Inference Protocol's clients (pyproject's `clients` extra, tests/support/clients_venv.py) in a venv
# of their own: kserve pins fastapi, psutil and protobuf versions that must not replace the service's.
# Only the tests need them, not `make serve`.
CLIENTS := .venv-clients
clients: $(CLIENTS)/.installed
$(CLIENTS)/.installed: pyproject.toml
	test -x $(CLIENTS)/bin/python || $(PYTHON) -m venv $(CLIENTS)
	$(PYTHON) -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['clients']))" \
	  | xargs $(CLIENTS)/bin/python -m pip install -q
	touch $@

# The runtime set (requirements.txt) and every extra: training, load tests, tests. Re-installs only when
# either file changed; torch/torchvision come from this machine's disk.
$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,loadtest,test]'
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

# The layers first: a contract break fails in a second, before minutes of tests.
# --durations: where the suite's minutes go, in every CI log (it must stay under 15 minutes on 2 cores);
# the tests marked long run in `make test-long`.
test: setup clients
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not long" --durations=25

test-long: setup clients
	$(PY) -m pytest -m long

# Workers on other hosts, through real TCP: network namespaces as hosts (root; `make test` runs it too).
multihost: setup
	$(PY) -m pytest -v tests/service/test_multihost.py

test-fast: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not server and not slow"

models: setup
	$(EFFNET) models

# Raw results go under benchmarks/results/<UTC date>-<short host name>/ (benchmarks/RESULTS.md is the index).
RESULTS_DIR = benchmarks/results/$(shell date -u +%Y%m%d)-$(shell hostname -s)
bench: setup
	$(EFFNET) bench --record $(RESULTS_DIR)/bench-$$(date -u +%H%M).json

# The default store ($BENTOML_HOME, else ~/bentoml): the Lite0 ImageNet import, then b0, mec and compact
# on Fashion-MNIST with the quick recipe, side by side (about 17 min on 2 cores). Skips what is stored.
QUICK_VARIANTS ?= b0 mec compact
checkpoints: setup
	$(EFFNET) import-pretrained lite0 --skip-existing
	$(EFFNET) train-many --variants $(shell echo $(QUICK_VARIANTS) | tr ' ' ,) --data fashion-mnist --recipe quick \
	  --skip-existing --no-progress
	$(EFFNET) store

# The full recipe (RandAugment, 40 epochs at 64x64): hours on a CPU, minutes per epoch on a GPU.
# NPROC=N runs it as N DDP processes; VARIANT picks the model. Stored under the same name as the quick
# checkpoint ({variant}-fashion-mnist), so `name:latest` (what the service serves) becomes the better model.
VARIANT ?= b0
NPROC ?= 1
train-full: setup
	$(EFFNET) train --variant $(VARIANT) --data fashion-mnist --recipe full --nproc $(NPROC)

# Exports, verifies and times the engines of every variant that service/config.yaml serves, exactly as
# its worker will (`effnet serve --prepare`): the artefacts are cached in each checkpoint's folder by the
# weights' sha256 and auto's choice is recorded beside them, so the first start only loads the winners.
# `effnet export TAG --engine all` exports and verifies one checkpoint for every engine.
engines: setup
	$(EFFNET) serve --prepare

# Fills the default store if empty (`checkpoints`) and prepares the engines (`engines`), then serves on
# 127.0.0.1:3000 (prints example curls). `effnet serve --check` (a few seconds) says whether both are
# done already, so a later `make serve` skips their no-op runs (about 70 s of start-ups) and is ready sooner.
serve: setup
	@$(EFFNET) serve --check || $(MAKE) --no-print-directory checkpoints engines
	$(EFFNET) serve

# Fills the default store if empty, starts the service and a private Prometheus, steps Locust through
# 1/4/16/32 users per variant and the split; LOADTEST_ARGS passes options (e.g. --url, --steps 1,8,
# --locust-workers 2 for a Locust master and two worker processes).
LOADTEST_ARGS ?=
loadtest: setup
	@$(EFFNET) serve --check || $(MAKE) --no-print-directory checkpoints engines
	$(EFFNET) loadtest --policies --max-seconds 900 $(LOADTEST_ARGS)

# Fills the default store if empty, then serves a private copy of it under steady load on every route and
# runs the fault scenarios one after another (docs/loadtest.md, "Chaos run"); fails if one fails.
# CHAOS_ARGS passes options (e.g. --scenarios kill-worker,sigterm, or --allow-fail to record a run).
CHAOS_ARGS ?=
chaos: setup
	@$(EFFNET) serve --check || $(MAKE) --no-print-directory checkpoints engines
	$(EFFNET) chaos $(CHAOS_ARGS)

# Fills the default store if empty, starts the service, finds its capacity (a short wrk ramp), loads every
# route at half of it for an hour and samples every server process's RSS, open files and threads; fails
# when a process grows past the goals (docs/loadtest.md, "Soak"). SOAK_ARGS passes options (--duration 30m).
SOAK_ARGS ?=
soak: setup
	@$(EFFNET) serve --check || $(MAKE) --no-print-directory checkpoints engines
	$(EFFNET) soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(CLIENTS) .pytest_cache
