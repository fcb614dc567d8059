# `make reproduce` and `make test` each build .venv on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
OUT ?= runs/default

.PHONY: reproduce quick test test-slow bench clean

$(BIN)/galaxyvae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The pinned CPU build first, so the package's torch range installs nothing more.
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

reproduce: $(BIN)/galaxyvae
	$(BIN)/galaxyvae reproduce --out $(OUT)

quick: $(BIN)/galaxyvae
	$(BIN)/galaxyvae reproduce --quick --out runs/quick

test: $(BIN)/galaxyvae
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/galaxyvae
	$(BIN)/python -m pytest -q --run-slow

clean:
	rm -rf $(VENV) runs
