"""Thin tasks: a snapshot's cut (resumable: a redelivered task carries on from the last whole chunk), the reaper that
hands out again what a dead worker left, and the retraining triggers (beat)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db.models import Q
from django.dispatch import receiver
from django.utils import timezone

from monitoring.datasets.cut import snapshot_cut
from monitoring.datasets.retraining import retraining_evaluate
from monitoring.datasets.services import snapshot_requested
from monitoring.models import DatasetSnapshot, SnapshotStatus
from portal.tasks import with_request_context


@shared_task(name="monitoring.tasks.snapshot_cut", ignore_result=True, acks_late=True)
@with_request_context
def snapshot_cut_task(snapshot_id: int) -> str:
    snapshot = snapshot_cut(snapshot_id=snapshot_id)
    return snapshot.status if snapshot is not None else "claimed elsewhere"


@receiver(snapshot_requested, dispatch_uid="monitoring.datasets.tasks.snapshot_cut")
def _snapshot_requested(*, snapshot_id: int, request_ctx: dict[str, Any], **_: Any) -> None:
    snapshot_cut_task.delay(snapshot_id, request_ctx=request_ctx)


@shared_task(name="monitoring.tasks.snapshots_reap", ignore_result=True)
def snapshots_reap_task() -> int:
    """Snapshots whose worker stopped beating, or still pending a minute after they were asked for (a lost
    message), are handed out again; the cut resumes from its cursor."""
    now = timezone.now()
    stale = now - dt.timedelta(seconds=settings.PORTAL_SNAPSHOT_STALE_SECONDS)
    ids = list(DatasetSnapshot.objects.filter(
        Q(status=SnapshotStatus.RUNNING, heartbeat_at__lt=stale)
        | Q(status=SnapshotStatus.PENDING, created_at__lt=now - dt.timedelta(seconds=60))).values_list("pk", flat=True))
    for pk in ids:
        snapshot_cut_task.delay(pk)
    return len(ids)


@shared_task(name="monitoring.tasks.retraining_evaluate", ignore_result=True)
def retraining_evaluate_task() -> dict[str, int]:
    return retraining_evaluate()
