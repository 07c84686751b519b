# Two commands matter (see README): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
# ruff (pinned in pyproject's test extras, so a new release's rules never fail a run by themselves) checks these.
RUFF_PATHS := config portal registry monitoring tests
# Test processes (pytest-xdist, whole files to a process, each with its own database, Redis db and var/); 0: one.
# Files are handed out longest first (tests/conftest.py, from tests/file_durations.json), not by their test count.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# `make run` is the developer's demo: DEBUG on unless the caller says otherwise.
run: export PORTAL_DEBUG ?= 1

.PHONY: run sandbox-check test-tools test test-fast test-long soak faults install install-test typecheck lint clean-var

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found %s)" % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamps are named after pyproject.toml's content, not its modification time: a virtualenv carried over from
# another checkout (or a file touched out of order) can never pass for one holding today's dependencies.
DEPS := $(shell sha256sum pyproject.toml | cut -c1-16)
INSTALLED := $(VENV)/.installed-$(DEPS)
INSTALLED_TEST := $(VENV)/.installed-test-$(DEPS)

$(INSTALLED): | $(VENV)/bin/python
	$(PIP) install --quiet -e .
	@touch $@

$(INSTALLED_TEST): | $(VENV)/bin/python
	$(PIP) install --quiet -e '.[test]'
	@touch $(INSTALLED) $@

install: $(INSTALLED)
install-test: $(INSTALLED_TEST)

# Uploaded models are loaded only inside bubblewrap's sandbox: find it, or install it where we can (as root on
# Debian or Ubuntu), or say in one line how to get it. Without it the portal still runs and serves ONNX models.
sandbox-check:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing bubblewrap (the model sandbox)..."; \
	    (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; }) \
	      || echo "Could not install bubblewrap: uploaded models will not be loaded until it is (apt-get install bubblewrap)."; \
	  else \
	    echo "bubblewrap is missing: uploaded models will not be loaded until it is installed (sudo apt-get install bubblewrap, or dnf install bubblewrap)."; \
	  fi; }

# The demo's settings (secrets, PORTAL_DEBUG, URLs) go to var/demo.env first, so that manage.py and the portal command
# work from a second terminal without variables (portal/demo_env.py); nothing is written when PORTAL_DEBUG is off.
run: $(INSTALLED) sandbox-check
	$(PY) -m portal.demo_env
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo
	$(PY) manage.py collectstatic --noinput -v 0
	exec $(PY) manage.py runstack

# The system tools the suite drives: bubblewrap (the model sandbox), Chromium (the browser journeys), kubectl and
# docker-compose (render the Kubernetes manifests and the compose file offline). As root on Debian or Ubuntu the
# missing ones are installed, as `make run` does for bubblewrap; anyone else is told in one line what to install,
# and the tests that need a missing tool are skipped saying the same line (tests/conftest.py require_tool).
TEST_TOOLS := bwrap:bubblewrap chromium:chromium kubectl:kubectl docker-compose:docker-compose
test-tools:
	@missing=""; for pair in $(TEST_TOOLS); do command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing the suite's system tools:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq $$missing >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; } \
	      || { echo "Could not install:$$missing (apt-get install$$missing)"; exit 1; }; \
	  else \
	    echo "The tests that need them are skipped until you run: sudo apt-get install$$missing"; \
	  fi; \
	fi

test: $(INSTALLED_TEST) test-tools
	@out=$$($(PY) manage.py makemigrations --check --dry-run --settings=tests.settings 2>&1) || { \
	  echo "$$out"; \
	  case "$$out" in *"Migrations for"*) echo "Models changed without a migration: run manage.py makemigrations";; \
	  *) echo "manage.py makemigrations --check could not run (see the error above)";; esac; exit 1; }
	$(VENV)/bin/ruff check $(RUFF_PATHS)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The edit-run loop: all but the browser journeys and the tests that start whole stacks, stopping at the first failure.
test-fast: $(INSTALLED_TEST)
	$(PY) -m pytest $(XDIST) -x -m "not slow and not browser" $(PYTEST_ARGS)

# The long suites (not in `make test`): real gunicorn, Celery, PostgreSQL and Redis under load for minutes.
# The soak needs wrk (apt-get install wrk); fault injection starts its own PostgreSQL cluster and Redis server so
# that restarting them disturbs no one else (PostgreSQL's server binaries and redis-server must be installed).
SOAK_MINUTES ?= 10
soak: $(INSTALLED_TEST)
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES)

faults: $(INSTALLED_TEST)
	$(PY) bench/faults.py

test-long: faults soak

typecheck: $(INSTALLED_TEST)
	$(VENV)/bin/mypy

lint: $(INSTALLED_TEST)
	$(VENV)/bin/ruff check $(RUFF_PATHS)

clean-var:
	rm -rf var
