"""Versions' background work: the sandboxed check of uploaded versions, then their global importance. The registered name stays
``registry.tasks.version_scan``: routing (CELERY_TASK_ROUTES) and queued messages name it."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from portal.tasks import RETRY_TRANSIENT, with_request_context
from registry.versions import services


@shared_task(name="registry.tasks.version_scan", bind=True, acks_late=True, **RETRY_TRANSIENT)
@with_request_context
def version_scan_task(self: Any, version_id: int) -> str:
    """Idempotent: a version that is no longer scanning is left as it is, so a redelivered task does nothing."""
    version = services.version_scan(version_id=version_id)
    return version.status


@shared_task(name="registry.tasks.version_explain", bind=True, acks_late=True, **RETRY_TRANSIENT)
@with_request_context
def version_explain_task(self: Any, version_id: int) -> str:
    """The global importance of a version the scan made ready (a second sandbox run); idempotent."""
    version = services.version_explain(version_id=version_id)
    return "error" if (version.explanation or {}).get("error") else "explained"
