"""Edge packages' background work. The registered name stays ``registry.tasks.*``: routing (CELERY_TASK_ROUTES)
and queued messages name it."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.dispatch import receiver

from portal.tasks import RETRY_TRANSIENT, with_request_context
from registry.edge import services


@shared_task(name="registry.tasks.edge_package_build", acks_late=True, reject_on_worker_lost=True, ignore_result=True,
             **RETRY_TRANSIENT)
@with_request_context
def edge_package_build_task(package_id: int) -> str | None:
    """Redelivered if its worker dies, run again after a transient outage; the service claims safely."""
    package = services.edge_package_build(package_id=package_id)
    return package.status if package else None


@receiver(services.package_requested, dispatch_uid="registry.edge.tasks.edge_package_build")
def _package_requested(*, package_id: int, request_ctx: dict[str, Any], **_: Any) -> None:
    edge_package_build_task.delay(package_id, request_ctx=request_ctx)
