# Set-up is part of each target: on a fresh machine `make demo` or `make test` creates .venv,
# installs the pinned stack (constraints.txt), then runs.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

.PHONY: setup demo test reliability
setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m jobs.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

reliability: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow -o log_cli=true tests/test_slow.py tests/test_soak.py
