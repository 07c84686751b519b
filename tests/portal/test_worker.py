"""A real Celery worker process on Redis runs the portal's tasks under the request context they were sent with."""

from __future__ import annotations

import time

import pytest

from portal.models import AuditEvent
from portal.tasks import audit_chain_verify_task

pytestmark = [pytest.mark.slow]


def test_a_task_carries_the_clicks_request_id_into_the_audit_trail(celery_worker_process: str) -> None:
    audit_chain_verify_task.apply_async(kwargs={"request_ctx": {"request_id": "click-worker-0001", "ip": "10.1.2.3",
                                                                "user_agent": "browser"}},
                                        queue=celery_worker_process)
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
