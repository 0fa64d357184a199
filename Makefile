# aiotasks developer tasks. A fresh clone needs only `make test` or `make demo`.
#
#   REDIS=auto      $AIOTASKS_REDIS_URL / $REDIS_URL, else 127.0.0.1:6379, else embedded Valkey
#   REDIS=embedded  always a fresh embedded Valkey (no Redis install needed)
#   REDIS=system    the env URL or 127.0.0.1:6379, which must answer
#
# e.g.  make test PYTEST_ARGS='-x -k chord'    make bench BENCH_ARGS='--tasks 10000'

PY ?= python3
VENV ?= .venv
REDIS ?= auto
PYTEST_ARGS ?=
EMBEDDED_PYTEST_ARGS ?= -m 'not slow'
BENCH_ARGS ?=
LINT_PATHS ?= aiotasks tests benchmarks examples

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
WITH_SERVER = $(VPY) -m aiotasks.testing.server --mode $(REDIS) --

.PHONY: all help install format lint typecheck test test-embedded demo bench bench-scripts bench-worker clean distclean

all: lint test

help:
	@echo "make [all] | install | format | lint | typecheck | test | test-embedded | demo | bench"
	@echo "     bench-scripts (Redis CPU per task, script by script)"
	@echo "     bench-worker (worker instructions per task, callgrind)"
	@echo "     clean | distclean (also removes $(VENV))"
	@echo "  REDIS=auto|embedded|system (now: $(REDIS))  PYTEST_ARGS=...  BENCH_ARGS=..."

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -e '.[dev]'
	@touch $@

# The peers live in venvs of their own: arq pins redis<6, which must not reach .venv, and
# pydocket needs redis>=6, so it cannot share .venv-peers. A peer venv that fails to install
# does not fail `make bench`: its peers are reported as skipped, and since its stamp is
# only written on success, the next `make bench` tries again.
PEERS_VENV ?= .venv-peers
DOCKET_VENV ?= .venv-docket
PEERS_STAMP := $(PEERS_VENV)/.installed-bench
DOCKET_STAMP := $(DOCKET_VENV)/.installed-bench
# $(call peer_venv,VENV,REQUIREMENTS,STAMP)
peer_venv = { test -x $(1)/bin/python || $(PY) -m venv $(1); } \
	&& $(1)/bin/python -m pip install -r $(2) && touch $(3) \
	|| echo "make bench: could not install $(1) from $(2); its peers will be reported as skipped"

$(BENCH_STAMP): $(STAMP)
	$(VPY) -m pip install psutil
	@touch $@

$(PEERS_STAMP): benchmarks/peers/requirements.txt
	$(call peer_venv,$(PEERS_VENV),$<,$@)

$(DOCKET_STAMP): benchmarks/peers/requirements-docket.txt
	$(call peer_venv,$(DOCKET_VENV),$<,$@)

install: $(STAMP)

format: $(STAMP)
	$(VPY) -m ruff format $(LINT_PATHS)
	$(VPY) -m ruff check --fix $(LINT_PATHS)

lint: $(STAMP)
	$(VPY) -m ruff check $(LINT_PATHS)
	$(VPY) -m ruff format --check $(LINT_PATHS)
	$(VPY) -m mypy aiotasks

typecheck: $(STAMP)
	$(VPY) -m mypy aiotasks

test: lint
	$(WITH_SERVER) $(VPY) -m pytest $(PYTEST_ARGS)

# the fast foundation subset against a fresh embedded Valkey
test-embedded: REDIS = embedded
test-embedded: lint
	$(WITH_SERVER) $(VPY) -m pytest $(EMBEDDED_PYTEST_ARGS) $(PYTEST_ARGS)

demo: $(STAMP)
	$(WITH_SERVER) $(VPY) examples/demo.py

bench: $(BENCH_STAMP) $(PEERS_STAMP) $(DOCKET_STAMP)
	$(WITH_SERVER) $(VPY) benchmarks/run.py --peers-python $(PEERS_VENV)/bin/python \
		--docket-python $(DOCKET_VENV)/bin/python $(BENCH_ARGS)

# Redis CPU per task of enqueue.lua, fetch.lua and finish.lua apart, on a server of its own.
bench-scripts: $(STAMP)
	$(VPY) benchmarks/script_cost.py $(BENCH_ARGS)

bench-worker: $(STAMP)
	$(VPY) benchmarks/worker_cost.py $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . \( -path ./$(VENV) -o -path ./.git \) -prune -o -name __pycache__ -type d -prune \
		-exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(PEERS_VENV) $(DOCKET_VENV)
