"""MLflow sync's background work: run one job (import a version, set an alias) and the periodic reconcile."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.dispatch import receiver

from portal.tasks import RETRY_TRANSIENT, with_request_context
from registry.mlflow_sync import services


@shared_task(name="registry.tasks.mlflow_sync_run", bind=True, acks_late=True, **RETRY_TRANSIENT)
@with_request_context
def mlflow_sync_run_task(self: Any, job_id: int) -> str:
    """Idempotent: a job that is not due is left alone; a failed try schedules the next one with backoff."""
    return str(services.sync_job_run(job_id=job_id).status)


@shared_task(name="registry.tasks.mlflow_reconcile", acks_late=True, **RETRY_TRANSIENT)
@with_request_context
def mlflow_reconcile_task() -> dict[str, int]:
    """Scheduled by beat every PORTAL_MLFLOW_RECONCILE_SECONDS: webhooks that never arrived, overdue retries."""
    return services.mlflow_reconcile()


@receiver(services.job_due, dispatch_uid="registry.mlflow_sync.tasks.mlflow_sync_run")
def _job_due(*, job_id: int, request_ctx: dict[str, Any], countdown: float, **_: Any) -> None:
    mlflow_sync_run_task.apply_async((job_id,), {"request_ctx": request_ctx}, countdown=countdown)
