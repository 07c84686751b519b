"""Versions' background work: the sandboxed check of uploaded versions, then their global importance. The registered name stays
``registry.tasks.version_scan``: routing (CELERY_TASK_ROUTES) and queued messages name it."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.dispatch import receiver

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


@receiver(services.scan_requested, dispatch_uid="registry.versions.tasks.version_scan")
def _scan_requested(*, version_id: int, request_ctx: dict[str, Any], **_: Any) -> None:
    version_scan_task.delay(version_id, request_ctx=request_ctx)


@receiver(services.explain_requested, dispatch_uid="registry.versions.tasks.version_explain")
def _explain_requested(*, version_id: int, request_ctx: dict[str, Any], **_: Any) -> None:
    version_explain_task.delay(version_id, request_ctx=request_ctx)
