# make demo: set up and run the demo; make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m tools.demo

clean:
	rm -rf $(VENV) demo_output
