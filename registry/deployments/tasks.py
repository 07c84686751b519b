"""Deployments' background work. The registered names stay ``registry.tasks.*``: routing (CELERY_TASK_ROUTES), beat
schedules and queued messages name them."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.dispatch import receiver

from portal.tasks import RETRY_TRANSIENT, with_request_context
from registry.deployments import services


@shared_task(name="registry.tasks.deployment_run", acks_late=True, reject_on_worker_lost=True, **RETRY_TRANSIENT)
@with_request_context
def deployment_run_task(deployment_id: int) -> str | None:
    """Redelivered if its worker dies (acks late, reject on worker lost), run again if the database or the broker
    was briefly away; the service claims safely."""
    deployment = services.deployment_run(deployment_id=deployment_id)
    return deployment.status if deployment else None


@shared_task(name="registry.tasks.deployments_reap", ignore_result=True)
def deployments_reap_task() -> list[int]:
    """Hand the stale deployments to a worker again."""
    stale = services.deployments_reap()
    for pk in stale:
        deployment_run_task.delay(pk)
    return stale


@receiver(services.deployment_requested, dispatch_uid="registry.deployments.tasks.deployment_run")
def _deployment_requested(*, deployment_id: int, request_ctx: dict[str, Any], **_: Any) -> None:
    deployment_run_task.delay(deployment_id, request_ctx=request_ctx)
