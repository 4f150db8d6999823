PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test test-lowest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@

# The lowest Tornado setup.cfg admits, in a venv of its own: CI runs the
# suite on it too, since notifier reads some of Tornado's private attributes
# (notifier/internals.py).
LOWEST_TORNADO := $(shell sed -n 's/.*tornado>=\([0-9.]*\).*/\1/p' setup.cfg)
LOWEST := .venv-lowest

$(LOWEST)/.installed-test: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install --quiet --upgrade pip
	$(LOWEST)/bin/pip install --quiet -e '.[test]' 'tornado==$(LOWEST_TORNADO)'
	touch $@

run: $(VENV)/.installed
	$(BIN)/notifier serve $(ARGS)

test: $(VENV)/.installed-test
	bash tests/prereqs.sh
	$(BIN)/python -m pytest $(ARGS)

test-lowest: $(LOWEST)/.installed-test
	bash tests/prereqs.sh
	$(LOWEST)/bin/python -c 'import tornado; print("tornado", tornado.version)'
	$(LOWEST)/bin/python -m pytest $(ARGS)

# The benchmarks, one after the other (never at once: each pins its server to core 0).
bench: $(VENV)/.installed-bench
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null) \
		|| echo "bench: wrk not installed; bench.publish falls back to its Python client" >&2
	$(BIN)/python -m bench.publish
	$(BIN)/python -m bench.fanout
	$(BIN)/python -m bench.storm
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) \
		|| echo "bench: redis-server not installed; bench.cluster cannot run" >&2
	$(BIN)/python -m bench.cluster

clean:
	rm -rf $(VENV) $(LOWEST) var .pytest_cache
