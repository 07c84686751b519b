"""Batch scoring's background work. Every task claims its row first, so a redelivered message does no harm; acks late
and reject on worker lost put a chunk whose worker died back on the queue at once; a database or broker restart makes
the task run again shortly (RETRY_TRANSIENT). The registered names stay ``registry.tasks.*``: routing
(CELERY_TASK_ROUTES), beat schedules and queued messages name them."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from portal.tasks import RETRY_TRANSIENT, with_request_context
from registry.batch import services

# A task that claims its row first: redelivered when its worker dies mid-run, run again after a transient outage.
_CLAIMED: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True, **RETRY_TRANSIENT}


@shared_task(name="registry.tasks.batch_plan", **_CLAIMED)
@with_request_context
def batch_plan_task(job_id: int) -> str | None:
    job = services.batch_plan(job_id=job_id)
    return job.status if job else None


@shared_task(name="registry.tasks.batch_chunk", **_CLAIMED)
@with_request_context
def batch_chunk_task(chunk_id: int) -> str:
    return services.batch_chunk_run(chunk_id=chunk_id)


@shared_task(name="registry.tasks.batch_assemble", **_CLAIMED)
@with_request_context
def batch_assemble_task(job_id: int) -> str | None:
    job = services.batch_assemble(job_id=job_id)
    return job.status if job else None


@shared_task(name="registry.tasks.batch_log", **_CLAIMED)
@with_request_context
def batch_log_task(chunk_id: int) -> int:
    return services.batch_log_chunk(chunk_id=chunk_id)


@shared_task(name="registry.tasks.batch_reap", ignore_result=True)
def batch_reap_task() -> dict[str, int]:
    return services.batch_reap()


@shared_task(name="registry.tasks.batch_schedule_fire", ignore_result=True)
@with_request_context
def batch_schedule_fire(schedule_id: int) -> str | None:
    job = services.batch_schedule_fire(schedule_id=schedule_id)
    return str(job.uid) if job else None
