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


# Batch scoring (registry.batch). Every task claims its row first, so a redelivered message does no harm; acks late
# and reject on worker lost put a chunk whose worker died back on the queue at once; a database or broker restart
# makes the task run again shortly (RETRY_TRANSIENT).


@shared_task(name="registry.tasks.batch_plan", acks_late=True, reject_on_worker_lost=True, ignore_result=True,
             **RETRY_TRANSIENT)
@with_request_context
def batch_plan_task(job_id: int) -> str | None:
    from registry.batch import batch_plan

    job = batch_plan(job_id=job_id)
    return job.status if job else None


@shared_task(name="registry.tasks.batch_chunk", acks_late=True, reject_on_worker_lost=True, ignore_result=True,
             **RETRY_TRANSIENT)
@with_request_context
def batch_chunk_task(chunk_id: int) -> str:
    from registry.batch import batch_chunk_run

    return batch_chunk_run(chunk_id=chunk_id)


@shared_task(name="registry.tasks.batch_assemble", acks_late=True, reject_on_worker_lost=True, ignore_result=True,
             **RETRY_TRANSIENT)
@with_request_context
def batch_assemble_task(job_id: int) -> str | None:
    from registry.batch import batch_assemble

    job = batch_assemble(job_id=job_id)
    return job.status if job else None


@shared_task(name="registry.tasks.batch_log", acks_late=True, reject_on_worker_lost=True, ignore_result=True,
             **RETRY_TRANSIENT)
@with_request_context
def batch_log_task(chunk_id: int) -> int:
    from registry.batch import batch_log_chunk

    return batch_log_chunk(chunk_id=chunk_id)


@shared_task(name="registry.tasks.batch_reap", ignore_result=True)
def batch_reap_task() -> dict[str, int]:
    from registry.batch import batch_reap

    return batch_reap()


@shared_task(name="registry.tasks.batch_schedule_fire", ignore_result=True)
@with_request_context
def batch_schedule_fire(schedule_id: int) -> str | None:
    from registry.batch import batch_schedule_fire as fire

    job = fire(schedule_id=schedule_id)
    return str(job.uid) if job else None
