"""Reads of batch jobs and schedules, always through the user's team scope."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from portal.permissions import get_object_for_user, scope_to_teams
from registry.models import BatchJob, BatchSchedule, BatchStatus

JOB_RELATED = ("model__team", "version", "input_blob", "result_blob", "errors_blob", "requested_by", "schedule")


def job_list(*, user: Any, model: str = "", status: str = "") -> QuerySet[BatchJob]:
    qs = scope_to_teams(BatchJob.objects.select_related(*JOB_RELATED), user)
    if model:
        qs = qs.filter(model__name=model)
    if status in BatchStatus.values:
        qs = qs.filter(status=status)
    return qs.order_by("-created_at")


def job_get(*, user: Any, uid: str) -> BatchJob:
    return get_object_for_user(user, BatchJob.objects.select_related(*JOB_RELATED), action="view_models",
                               uid=uid)


def schedule_get(*, user: Any, pk: int) -> BatchSchedule:
    return get_object_for_user(user, BatchSchedule.objects.select_related("model__team", "created_by"),
                               action="view_models", pk=pk)
