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
	$(BIN)/libkd train-teacher -c configs/digits-resnet-teacher.yaml
	$(BIN)/libkd train-teacher -c configs/digits-rednet-teacher.yaml
	$(BIN)/libkd precompute -c configs/digits-store.yaml
	$(BIN)/libkd store info runs/digits-store
	$(BIN)/libkd store verify runs/digits-store --samples 32
	$(BIN)/libkd distill -c configs/digits-distill.yaml --mode none --out runs/digits-student-none
	$(BIN)/libkd distill -c configs/digits-distill.yaml
	$(BIN)/libkd evaluate runs/digits-resnet-teacher/teacher
	$(BIN)/libkd evaluate runs/digits-rednet-teacher/teacher
	$(BIN)/libkd evaluate runs/digits-student-none/student
	$(BIN)/libkd evaluate runs/digits-student-store/student --teachers runs/digits-resnet-teacher/teacher runs/digits-rednet-teacher/teacher
	$(BIN)/libkd report runs/digits-student-none runs/digits-student-store --to runs/digits-report

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
