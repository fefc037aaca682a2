# Every target creates .venv first when it is missing (or when the requirements change).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install test test-fast lint
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

lint: install
	$(PY) -m ruff check .

# The README's test command: lint, then every test (slow ones included).
test: lint
	$(PY) -m pytest -q

# A quick local loop: skips the multi-process and long tests.
test-fast: lint
	$(PY) -m pytest -q -m "not slow"
