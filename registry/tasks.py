"""Registry background work: the sandboxed check of uploaded versions."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from portal.tasks import RETRY_TRANSIENT, with_request_context
from registry import services


@shared_task(name="registry.tasks.version_scan", bind=True, acks_late=True, **RETRY_TRANSIENT)
@with_request_context
def version_scan_task(self: Any, version_id: int) -> str:
    """Idempotent: a version that is no longer scanning is left as it is, so a redelivered task does nothing."""
    version = services.version_scan(version_id=version_id)
    return version.status


@shared_task(name="registry.tasks.deployment_run", acks_late=True, reject_on_worker_lost=True, **RETRY_TRANSIENT)
@with_request_context
def deployment_run_task(deployment_id: int) -> str | None:
    """Redelivered if its worker dies (acks late, reject on worker lost), run again if the database or the broker
    was briefly away; the service claims safely."""
    from registry.deployments import deployment_run

    deployment = deployment_run(deployment_id=deployment_id)
    return deployment.status if deployment else None


@shared_task(name="registry.tasks.deployments_reap", ignore_result=True)
def deployments_reap_task() -> list[int]:
    from registry.deployments import deployments_reap

    return deployments_reap()
