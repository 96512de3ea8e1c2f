# make demo: set up .venv and run the main job.  make test: set up .venv and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gptkern-installed

.PHONY: setup demo test test-gpu bench clean

setup: $(STAMP)

CSRC := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml setup.py tools/bootstrap.sh $(CSRC)
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/bootstrap.sh
	touch $@

demo: setup
	$(PY) -m gptkern demo

test: setup
	$(PY) -m pytest

test-gpu: setup
	$(PY) -m pytest -m gpu

bench: setup
	$(PY) -m gptkern bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
