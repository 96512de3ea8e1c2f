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

# pytest-xdist workers for `make test`: the cores this process may use, at most 4 (the Triton
# interpreter's tests are single-threaded Python); 1 (or no xdist in the venv): one process.
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 4))' 2>/dev/null || echo 1)

test: setup
	@if [ "$(TEST_WORKERS)" -gt 1 ] && $(PY) -c 'import xdist' 2>/dev/null; then \
	  echo "$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup"; $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup; \
	else echo "$(PY) -m pytest"; $(PY) -m pytest; fi

test-gpu: setup
	$(PY) -m pytest -m gpu

bench: setup
	$(PY) -m gptkern bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
