PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test bench clean

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

run: $(VENV)/.installed
	$(BIN)/notifier serve $(ARGS)

test: $(VENV)/.installed-test
	bash tests/prereqs.sh
	$(BIN)/python -m pytest $(ARGS)

# Both benchmarks, one after the other (never at once: each pins its server to core 0).
bench: $(VENV)/.installed-bench
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null) \
		|| echo "bench: wrk not installed; bench.publish falls back to its Python client" >&2
	$(BIN)/python -m bench.publish
	$(BIN)/python -m bench.fanout

clean:
	rm -rf $(VENV) var .pytest_cache
