# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Each creates or reuses the in-repo virtual environment .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/libkd data info digits
	$(BIN)/libkd study configs/digits-demo.yaml
	$(BIN)/libkd export runs/digits-demo/runs/both-s0/student --int8 dynamic --out runs/digits-demo/export
	$(BIN)/libkd compare runs/digits-demo/runs/both-s0/student --to runs/digits-demo/compare

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
