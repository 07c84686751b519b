"""A real Celery worker process on Redis runs the portal's tasks under the request context they were sent with."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

from portal.models import AuditEvent
from portal.tasks import audit_chain_verify_task

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow]


@pytest.fixture
def worker_process(transactional_db: None):  # type: ignore[no-untyped-def]
    db = settings.DATABASES["default"]
    assert db["ENGINE"].endswith("postgresql"), "worker tests run against PostgreSQL"
    env = {**os.environ,
           "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
           "DJANGO_SETTINGS_MODULE": "tests.settings"}
    queue = f"test-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "portal", "worker", "--pool", "solo",
                             "--loglevel", "WARNING", "-Q", queue, "--without-heartbeat", "--without-gossip",
                             "--without-mingle"], cwd=ROOT, env=env)
    yield queue
    proc.terminate()
    proc.wait(timeout=30)


def test_a_task_carries_the_clicks_request_id_into_the_audit_trail(worker_process: str) -> None:
    audit_chain_verify_task.apply_async(kwargs={"request_ctx": {"request_id": "click-worker-0001", "ip": "10.1.2.3",
                                                                "user_agent": "browser"}},
                                        queue=worker_process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        event = AuditEvent.objects.filter(action="audit.verify").first()
        if event:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the worker did not run the task within 60 s")
    assert (event.request_id, event.ip, event.actor_username, event.outcome) == (
        "click-worker-0001", "10.1.2.3", "", "success")
    assert event.metadata["ok"] is True
