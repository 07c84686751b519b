# Two commands matter (see README): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=

# `make run` is the developer's demo: DEBUG on unless the caller says otherwise.
run: export PORTAL_DEBUG ?= 1

.PHONY: run test install install-test typecheck lint clean-var

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found %s)" % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e '.[test]'
	@touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: $(VENV)/.installed
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo
	$(PY) manage.py collectstatic --noinput -v 0
	exec $(PY) manage.py runstack

test: $(VENV)/.installed-test
	$(PY) manage.py makemigrations --check --dry-run --settings=tests.settings >/dev/null || (echo "Models changed without a migration: run manage.py makemigrations"; exit 1)
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

typecheck: $(VENV)/.installed-test
	$(VENV)/bin/mypy

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check portal registry monitoring tests

clean-var:
	rm -rf var
