# make demo: set up and run the demo; make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-oldest venv clean

venv: $(VENV)/.installed

# the versions the suite is run with here (requirements.txt states the supported range);
# `make venv PINS=` takes the newest the range allows
PINS ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt $(PINS)
	touch $@

# the type check, then the tests in TEST_WORKERS processes (pytest-xdist; each test
# file stays in one of them, in its order); the 10 slowest are listed after every run
TEST_WORKERS ?= 2

test: venv
	$(PY) -m mypy
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile --durations=10

# the suite again on the oldest torch and torchvision requirements.txt admits, in a
# venv of its own, so that an API newer than the range fails here first
test-oldest:
	$(MAKE) test VENV=.venv-oldest PINS="torch==2.11.0 torchvision==0.26.0"

# CIFAR-10 for the demo where this machine keeps it; else the demo looks in its cache,
# then downloads it, then falls back to generated shapes (make demo DEMO_DATA=PATH)
DEMO_DATA ?= $(wildcard ../shared/data/cifar10-jpeg.tar.gz)

demo: venv
	$(PY) -m tools.demo $(if $(DEMO_DATA),--data $(DEMO_DATA))

clean:
	rm -rf $(VENV) .venv-oldest demo_output
