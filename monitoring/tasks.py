from __future__ import annotations

from typing import Any

from celery import shared_task
from django.dispatch import receiver

from monitoring.alerts import evaluate_alerts
from monitoring.experiments.tasks import experiments_check_task  # noqa: F401 - registered with Celery here
from monitoring.flush import fan_out_allowed, flush_predictions
from monitoring.gdpr import payloads_purge, subject_report_compile, subject_report_requested
from monitoring.partitions import partitions_maintain
from monitoring.rollups import rollup_dirty
from portal.tasks import with_request_context
from registry.serving import buffer


@shared_task(name="monitoring.tasks.flush_predictions", ignore_result=True)
def flush_predictions_task() -> int:
    """Beat starts one every ``PORTAL_FLUSH_SECONDS``; a run that finds a backlog starts one more (at most one a
    second in all), so a backlog is drained by as many flushers as the monitor workers have processes."""
    return flush_predictions(on_backlog=_start_another)


def _start_another() -> None:
    client = buffer.redis_client()
    if client is not None and fan_out_allowed(client):
        flush_predictions_task.apply_async()


@shared_task(name="monitoring.tasks.purge_payloads", ignore_result=True)
def purge_payloads_task() -> dict[str, dict[str, int]]:
    return payloads_purge()


@shared_task(name="monitoring.tasks.rollup", ignore_result=True)
def rollup_task() -> int:
    return rollup_dirty()


@shared_task(name="monitoring.tasks.evaluate_alerts", ignore_result=True)
def evaluate_alerts_task() -> dict[str, int]:
    return evaluate_alerts()


@shared_task(name="monitoring.tasks.partitions_maintain", ignore_result=True)
def partitions_maintain_task() -> dict[str, object]:
    return partitions_maintain()


@shared_task(name="monitoring.tasks.attribution_drift", ignore_result=True)
def attribution_drift_task() -> int:
    from monitoring.attribution import measure_all

    return measure_all()


@shared_task(name="monitoring.tasks.subject_report", ignore_result=True)
@with_request_context
def subject_report_task(report_id: int) -> str:
    """A compliance officer's subject access report (``monitoring.gdpr.subject_report_compile``)."""
    report = subject_report_compile(report_id=report_id)
    return report.status if report is not None else "erased meanwhile"


@receiver(subject_report_requested, dispatch_uid="monitoring.tasks.subject_report")
def _subject_report_requested(*, report_id: int, request_ctx: dict[str, Any], **_: Any) -> None:
    subject_report_task.delay(report_id, request_ctx=request_ctx)
