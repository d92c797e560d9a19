# Set-up is part of each target: on a fresh machine `make demo` or `make test` creates .venv,
# installs the pinned stack (constraints.txt), then runs. `make test-lowest` builds .venv-lowest with the
# lowest supported versions (constraints-lowest.txt) and runs a fast subset there (about 5.5 minutes on 2
# cores, the install included).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LOWEST := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed
# every Delta reader on a real job's output (the models built and loaded by transformers), the write-time
# schema check, the Arrow <-> numpy helpers, aggregation, part writers, the float16 vector store, and the
# features against transformers' own extractors: what the lowest pyarrow, numpy, pandas and transformers
# touch first
LOWEST_TESTS := tests/test_readers.py tests/test_schemas.py tests/test_arrow.py tests/test_aggregate.py \
	tests/test_sink.py tests/test_vectors.py tests/test_features.py

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(LOWEST_STAMP): pyproject.toml constraints-lowest.txt
	rm -rf $(LOWEST)
	$(PY) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q --upgrade pip
	$(LOWEST)/bin/pip install -q -c constraints-lowest.txt -e '.[test]' daft  # daft: pyarrow<26, so here only
	touch $(LOWEST_STAMP)

.PHONY: setup demo test test-lowest reliability
setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m jobs.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15 tests

test-lowest: $(LOWEST_STAMP)
	$(LOWEST)/bin/python -m pytest -q $(LOWEST_TESTS)

reliability: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow -o log_cli=true tests/test_slow.py tests/test_soak.py
