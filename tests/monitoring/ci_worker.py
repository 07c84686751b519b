"""A real Celery worker for the datasets journey, whose DNS answers ``ci.example.com`` with the test's local CI
receiver (the outside world is mocked at its edge: name resolution). Every other name resolves, and is checked, as
in production: ``python tests/monitoring/ci_worker.py -A config worker ...``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

from portal import webhook_policy  # noqa: E402

_real_resolve = webhook_policy.resolve_public


def _resolve(host: str, port: int) -> list[str]:
    return ["127.0.0.1"] if host == "ci.example.com" else _real_resolve(host, port)


webhook_policy.resolve_public = _resolve

from celery.bin.celery import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(main())
