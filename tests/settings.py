"""Test settings: the real settings module, pointed at PostgreSQL and Redis unless told otherwise.

.ci/run exports DATABASE_URL and CELERY_BROKER_URL; on a developer's machine of this kind the local services are used.
"""

from __future__ import annotations

import os
from pathlib import Path

_root = Path(__file__).resolve().parent.parent
os.environ.setdefault("PORTAL_SECRET_KEY", "tests-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz")
os.environ.setdefault("PORTAL_DEBUG", "0")
# Production's rule (portal/checks.py): the keys are given, never derived or generated. Test-only values.
os.environ.setdefault("PORTAL_PAYLOAD_KEYS", "NH4Yxr2bIzZf21P0Yo8BK1qjWifarquKp4AmIWPb1M4=")
os.environ.setdefault("PORTAL_SUBJECT_HASH_KEY", "tests-only-subject-hash-key-0123456789abcdef")
os.environ.setdefault("PORTAL_AUDIT_SIGNING_KEY", "-----BEGIN PRIVATE KEY-----\n"
                      "MC4CAQAwBQYDK2VwBCIEIAxg0LrD3ZcITDl5pc8XWLWbYIvYvhVevwpMSOYI4mkk\n-----END PRIVATE KEY-----\n")
os.environ.setdefault("PORTAL_EDGE_SIGNING_KEY", "-----BEGIN PRIVATE KEY-----\n"
                      "MC4CAQAwBQYDK2VwBCIEIEQYP1K6bKfGC9GUFnJsDPuLqu9FRBS9Y5vGNQ5+dvk9\n-----END PRIVATE KEY-----\n")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/portal")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")
os.environ.setdefault("PORTAL_SECURE_SSL_REDIRECT", "0")
os.environ.setdefault("PORTAL_SECURE_COOKIES", "0")
os.environ.setdefault("PORTAL_HSTS_SECONDS", "0")
os.environ.setdefault("PORTAL_VAR_DIR", str(_root / "var" / "test"))
os.environ.setdefault("PORTAL_ALLOWED_HOSTS", "localhost,127.0.0.1,testserver")
# One queue: the worker fixtures move it to a private queue per test (tests/portal/test_settings.py checks routing).
os.environ.setdefault("PORTAL_CELERY_QUEUE", "celery")
# Most tests promote versions that never took traffic; the tests of the minimum set it themselves.
os.environ.setdefault("PORTAL_PROMOTION_MIN_PREDICTIONS", "0")


def _own_for_xdist_worker(worker: str) -> None:
    """Under pytest-xdist, worker ``gwN`` gets Redis database base+N and the var folder ``<var>/gwN`` of its own
    (pytest-django already gives it its own PostgreSQL database): the prediction buffer, rate counters, caches and
    artifact store are keyed by name, not by test, so two workers sharing them would take each other's records.
    Set in the environment, so the Celery workers and portal processes a test starts inherit them (and, inheriting
    ``PYTEST_XDIST_WORKER`` too, find the marker that they are already applied)."""
    from urllib.parse import urlsplit, urlunsplit

    if os.environ.get("PORTAL_TESTS_OWN_FOR") == worker:
        return
    os.environ["PORTAL_TESTS_OWN_FOR"] = worker

    n = int(worker.removeprefix("gw"))
    broker = urlsplit(os.environ["CELERY_BROKER_URL"])
    if broker.scheme in ("redis", "rediss"):
        db = int(broker.path.strip("/") or 0)
        os.environ["CELERY_BROKER_URL"] = urlunsplit(broker._replace(path=f"/{(db + n) % 16}"))
    os.environ["PORTAL_VAR_DIR"] = str(Path(os.environ["PORTAL_VAR_DIR"]) / worker)


if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    _own_for_xdist_worker(os.environ["PYTEST_XDIST_WORKER"])

from config.settings import *

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}
WHITENOISE_USE_FINDERS = True
# The global importance of a journey's pipeline (Kernel SHAP over its reference rows) needs more than production's
# 30 s when the suite's two processes, their workers and Chromium share two cores: a CI run failed the compliance
# journey with "not one reference row could be explained within 30 s". Production keeps its default.
PORTAL_EXPLAIN_GLOBAL_SECONDS = 120
# Model hosts keep the test processes' priority: the suite's two processes, their Celery workers, MLflow servers and
# Chromium keep both cores busy, and a host at production's niceness (10, a tenth of the weight) then warms up too
# slowly for the deployments' deadlines. The tests of the priority itself set it (test_boundary, test_hostile_uploads).
PORTAL_MODEL_HOST_NICE = 0
