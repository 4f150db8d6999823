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

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
