# make run   : create .venv, install, serve the example WSGI app on 127.0.0.1:8000
# make test  : create .venv, install with test extras, run the whole suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run run-asgi test test-unit test-process lint format bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/forkserve examples.hello_wsgi:app --bind 127.0.0.1:8000 --workers 2

run-asgi: $(STAMP)
	$(VENV)/bin/forkserve examples.hello_asgi:app --bind 127.0.0.1:8000 --workers 2

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

test-process: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/process

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) scripts/bench.py

bench-quick: $(STAMP)
	$(PY) scripts/bench.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
