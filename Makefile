# `make test` and `make demo` create the environment on first use, then run.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: env test demo benchmark-synthetic clean-runs

env: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

clean-runs:
	rm -rf runs
