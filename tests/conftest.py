"""Personas, API clients and helpers shared by every test.

The personas: a data scientist, two approvers, a compliance officer, an admin, a viewer, all in team ``acme``;
and an outsider, a data scientist of team ``other``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.http import HttpResponse
from django.test import Client
from django.test.client import ClientHandler
from rest_framework.test import APIClient

from portal import services
from portal.models import Membership, Team
from portal.roles import ADMIN, APPROVER, COMPLIANCE_OFFICER, DATA_SCIENTIST, VIEWER, sync_roles

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's sync API runs an event loop.

PASSWORD = "persona-pass-123456"


# --- Scheduling: longest files first -------------------------------------------------------------------------------
# `make test` gives whole files to each test process (pytest-xdist's --dist loadfile, with --no-loadscope-reorder so
# that the order below is the order they are handed out in). Handed out longest first, no long file starts late and
# keeps one process busy after the others ran out of work (the longest-processing-time-first rule). The weights are
# seconds per file on a 2-core machine (tests/file_durations.json: for now estimates for the longest files, from
# partial runs; rewrite it with `python -m tests.file_durations` from a whole run's --junitxml); a file it does not
# know weighs a second per test.
FILE_DURATIONS = Path(__file__).with_name("file_durations.json")
UNKNOWN_SECONDS_PER_TEST = 1.0


def file_weights(items: list[pytest.Item]) -> dict[str, float]:
    import json

    known: dict[str, float] = json.loads(FILE_DURATIONS.read_text()) if FILE_DURATIONS.exists() else {}
    counts: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        counts[path] = counts.get(path, 0) + 1
    return {path: float(known.get(path, n * UNKNOWN_SECONDS_PER_TEST)) for path, n in counts.items()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, files longest first (each file's own order kept, as pytest-django left it)."""
    if not hasattr(config, "workerinput"):  # collection happens in the test processes; -n 0 keeps pytest's order
        return
    weights = file_weights(items)
    first_seen = {}
    for i, item in enumerate(items):
        first_seen.setdefault(item.nodeid.split("::", 1)[0], i)
    items.sort(key=lambda item: (-weights[(path := item.nodeid.split("::", 1)[0])], first_seen[path]))


@pytest.fixture(scope="session", autouse=True)
def fresh_var_dir() -> None:
    """Start every run with empty artifact and upload folders under the test var/ directory."""
    import shutil

    from django.conf import settings

    for name in ("artifacts", "uploads", "tmp"):
        shutil.rmtree(Path(settings.VAR_DIR) / name, ignore_errors=True)
        (Path(settings.VAR_DIR) / name).mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session", autouse=True)
def mlflow_models_list_their_flavors_default_requirements() -> Iterator[None]:
    """The tests save many MLflow models, each the way MLflow's documentation does; for each, ``save_model`` starts a
    Python process that loads the model again to list the packages it imports (requirements.txt): 4 to 20 s a model
    on this machine, against 0.1 s for the rest of the save. Neither the portal nor ``mlflow models serve
    --env-manager local`` reads those requirements, so in this process the list is MLflow's defaults for the flavor,
    what MLflow itself writes when that inference fails. Everything else a model's folder holds is as MLflow writes it."""
    import mlflow.models

    inferred = mlflow.models.infer_pip_requirements

    def flavor_defaults(model_uri: str, flavor: str, fallback: list[str] | None = None, **kwargs: Any) -> list[str]:
        return list(fallback) if fallback is not None else inferred(model_uri, flavor, fallback, **kwargs)

    mlflow.models.infer_pip_requirements = flavor_defaults
    try:
        yield
    finally:
        mlflow.models.infer_pip_requirements = inferred


@pytest.fixture(autouse=True)
def private_checkpoint_store(settings: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Audit checkpoints are files outside the database, so a test's rolled-back events would leave its checkpoints
    behind for the next test to disagree with: each test gets a store folder of its own."""
    location = tmp_path_factory.mktemp("checkpoint-store")
    settings.STORAGES = {**settings.STORAGES, "audit_checkpoints": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": location}}}
    return location


@pytest.fixture(autouse=True)
def sandbox_answers_once_per_artifact(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeated sandboxed check of the same artifact answers what its first real run did (tests/sandbox_cache.py);
    tests marked ``real_sandbox`` always run the real thing, and ``PORTAL_TESTS_SANDBOX_CACHE=0`` makes every test do so."""
    if request.node.get_closest_marker("real_sandbox") is None and os.environ.get("PORTAL_TESTS_SANDBOX_CACHE") != "0":
        from tests import sandbox_cache

        sandbox_cache.install(monkeypatch)


class _SecretWatch(logging.Handler):
    """Collects log records (of this process) that carry an API token or a persona's password."""

    PATTERNS = (re.compile(r"mlp_[A-Za-z0-9_-]{40}"), re.compile(re.escape(PASSWORD)))

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage() + (record.exc_text or "")
        except Exception:  # a record that cannot format itself holds no readable secret
            return
        if any(p.search(text) for p in self.PATTERNS):
            self.leaks.append(f"{record.name}: {text[:300]}")


@pytest.fixture(scope="session", autouse=True)
def no_secrets_in_logs() -> Iterator[None]:
    """Across the whole run, nothing the portal logs holds a token or a password (checked when the run ends)."""
    watch = _SecretWatch()
    logging.getLogger().addHandler(watch)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(watch)
    assert not watch.leaks, f"secrets in the application log: {watch.leaks[:5]}"


@pytest.fixture
def make_user(db: Any) -> Callable[..., Any]:
    User = get_user_model()
    synced = False

    def make(username: str, role: str | None, teams: list[str] | tuple[str, ...] = ("acme",), **extra: Any) -> Any:
        nonlocal synced
        if not synced:  # once per test: the groups live in the test's transaction, so each test makes its own
            sync_roles()
            synced = True
        user = User.objects.create_user(username=username, password=PASSWORD, email=f"{username}@example.invalid",
                                        **extra)
        if role:
            user.groups.add(Group.objects.get(name=role))
        for slug in teams:
            team, _ = Team.objects.get_or_create(slug=slug, defaults={"name": slug.title()})
            Membership.objects.get_or_create(team=team, user=user)
        return user

    return make


@pytest.fixture
def personas(make_user: Callable[..., Any]) -> dict[str, Any]:
    return {
        "ds": make_user("dana", DATA_SCIENTIST),
        "approver1": make_user("alex", APPROVER),
        "approver2": make_user("blair", APPROVER),
        "compliance": make_user("casey", COMPLIANCE_OFFICER),
        "admin": make_user("ada", ADMIN, is_staff=True, is_superuser=True),
        "viewer": make_user("vic", VIEWER),
        "outsider": make_user("olly", DATA_SCIENTIST, teams=("other",)),
    }


@pytest.fixture
def api_as(db: Any) -> Callable[[Any], APIClient]:
    """An API client authenticated with a real bearer token of ``user`` (None: anonymous)."""

    def client_for(user: Any) -> APIClient:
        client = APIClient()
        if user is not None:
            _token, plaintext = services.token_create(user=user, name="tests", actor=user)
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
        return client

    return client_for


class EntryPointClient(Client):
    """Django's test client whose scoring requests go through the production WSGI entry point
    (``config.wsgi.application``, which answers them without Django's handler); other requests go the usual way."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__(**defaults)
        self.handler = self._handle  # type: ignore[assignment]
        self._django = ClientHandler(enforce_csrf_checks=False)

    def _handle(self, environ: dict[str, Any]) -> HttpResponse:
        from registry.serving.wsgi import SCORING_PATH

        if not SCORING_PATH.match(environ["PATH_INFO"]):
            return self._django(environ)
        status, headers, content = call_entry_point(environ)
        response = HttpResponse(content, status=int(status.split()[0]))
        for key, value in headers:
            response[key] = value
        response.wsgi_request = None  # type: ignore[attr-defined]
        return response


def call_entry_point(environ: dict[str, Any], app: Any = None) -> tuple[str, list[tuple[str, str]], bytes]:
    """One request through ``app`` (default: the production entry point ``config.wsgi.application``): its status
    line, headers and body."""
    from django.core import signals
    from django.db import close_old_connections

    from config.wsgi import application

    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        captured["status"], captured["headers"] = status, headers

    # As Django's ClientHandler does: the test's transaction must outlive the request's connection upkeep.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        content = b"".join((app or application)(environ, start_response))
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)
    return captured["status"], captured["headers"], content


def assert_error_shape(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.content[:500])
    body = response.json()
    # The scoring route also carries MLflow's error_code and message beside the contract's error object.
    assert set(body) == {"error"} or (set(body) == {"error", "error_code", "message"} and body["error_code"]
                                      and body["message"] == body["error"]["message"]), body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
    return body


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the portal's and the test run's settings, plus ``extra``."""
    dropped = ("PORTAL_", "DATABASE_URL", "CELERY_", "DJANGO_", "PYTEST_XDIST_")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(dropped)}, **extra}


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on (once the probing socket is closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def manage(*args: str, env_vars: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``manage.py ARGS`` in a fresh process with only ``env_vars`` (and a private var folder) as configuration."""
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=clean_env(PORTAL_VAR_DIR=str(tmp_path), **env_vars), timeout=120)


def settings_variables() -> set[str]:
    """Every environment variable the settings (and the rest of ``config/`` and ``portal/``) read through
    ``portal.env``."""
    found: set[str] = set()
    for path in [*(ROOT / "config").rglob("*.py"), *(ROOT / "portal").rglob("*.py")]:
        found |= set(re.findall(r'env_\w+\(\s*"([A-Z][A-Z0-9_]+)"', path.read_text()))
    return found


@pytest.fixture
def worker_factory(transactional_db: None) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts real Celery worker processes (solo pool) on Redis, bound to this test's database and to a private
    queue that this process's ``.delay()`` calls are routed to for the duration of the test."""
    from django.conf import settings

    from config.celery import app

    db = settings.DATABASES["default"]
    assert db["ENGINE"].endswith("postgresql"), "worker tests run against PostgreSQL"
    queue = f"test-{os.getpid()}-{os.urandom(3).hex()}"
    base_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PORTAL_CELERY_QUEUE": queue,
                "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"}
    started: list[subprocess.Popen[bytes]] = []

    def start(**extra_env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo",
                                 "--loglevel", "WARNING", "-Q", queue, "--without-heartbeat", "--without-gossip",
                                 "--without-mingle", "-n", f"w{len(started)}-{queue}@%h"], cwd=ROOT,
                                env={**base_env, **extra_env}, start_new_session=True)
        started.append(proc)
        return proc

    start.queue = queue  # type: ignore[attr-defined]
    previous = app.conf.task_default_queue
    app.conf.task_default_queue = queue
    try:
        yield start
    finally:
        app.conf.task_default_queue = previous
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def celery_worker_process(worker_factory: Callable[..., subprocess.Popen[bytes]]) -> str:
    """One real worker process on a private queue (see ``worker_factory``)."""
    worker_factory()
    return str(worker_factory.queue)  # type: ignore[attr-defined]


# The system tools the suite drives, each with the Debian or Ubuntu package that brings it (the Makefile's
# test-tools target installs them as root, and names them in one line to anyone else).
SYSTEM_TOOLS = {"bwrap": "bubblewrap", "chromium": "chromium", "kubectl": "kubectl", "docker-compose": "docker-compose"}


def missing_tools_line() -> str:
    import shutil

    missing = [package for binary, package in SYSTEM_TOOLS.items() if shutil.which(binary) is None]
    return f"sudo apt-get install {' '.join(missing)}" if missing else ""


def require_tool(binary: str) -> str:
    """The path of ``binary``. Missing: a skip naming every missing tool in one install line, except as root or in
    CI, where `make test` installs them, so a missing one there is a failure."""
    import shutil

    found = shutil.which(binary)
    if found:
        return found
    why = f"{binary} is missing; the suite's system tools: {missing_tools_line()}"
    if os.geteuid() == 0 or os.environ.get("CI", "").lower() == "true":
        pytest.fail(why + " (`make test` installs them as root)")
    pytest.skip(why)


def wait_for(predicate: Callable[[], Any], *, timeout: float = 60, interval: float = 0.2,
             what: str | Callable[[], str] = "") -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    described = what() if callable(what) else what  # a callable describes the state the wait ended in
    pytest.fail(f"timed out after {timeout} s waiting for {described or predicate}")


def needs_sandbox() -> pytest.MarkDecorator:
    """Skip where bubblewrap cannot start a sandbox, except in CI (CI=true), where every sandbox test must run: a
    sandbox that silently stopped working there must fail the run, not skip it."""
    from registry.sandbox import bwrap

    reason = bwrap.probe()
    return pytest.mark.skipif(reason is not None and not os.environ.get("CI"), reason=f"no sandbox here: {reason}")
