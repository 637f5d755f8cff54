# `make test` and `make demo` build their own virtual environment on first use (.venv), so a fresh clone
# needs nothing but python3 (3.10+) and pip access to the pinned requirements.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-installed

.PHONY: venv test demo bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

demo: $(STAMP)
	$(PY) demo/run.py

bench: $(STAMP)
	$(PY) benchmarks/encode_decode.py

clean:
	rm -rf $(VENV) .pytest_cache
