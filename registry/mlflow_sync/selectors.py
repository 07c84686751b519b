"""Reads for the MLflow connections page: each connection a person's teams hold, with what its webhook has done
lately, when the reconcile last ran, and the sync jobs that need a person (failures and retries)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db.models import Count, Max, Q
from django.utils import timezone

from portal.audit.actions import AuditAction
from portal.models import AuditEvent
from portal.permissions import scope_to_teams
from registry.models import MlflowConnection, MlflowSyncJob, MlflowSyncStatus

PROBLEM_STATUSES = (MlflowSyncStatus.RETRYING, MlflowSyncStatus.FAILED, MlflowSyncStatus.REFUSED)
REFUSED_WINDOW = dt.timedelta(hours=24)


def connection_list(*, user: Any) -> list[MlflowConnection]:
    return list(scope_to_teams(MlflowConnection.objects.select_related("team", "created_by"), user)
                .order_by("team__slug", "-active", "tracking_uri"))


def connections_overview(*, user: Any, problems_per_connection: int = 20) -> list[dict[str, Any]]:
    """One entry per connection of ``user``'s teams: the connection, its webhook's last accepted delivery and the
    deliveries refused in the last 24 hours (from the audit trail, where every delivery is recorded), job counts
    by status, and its failing or retrying jobs, newest first."""
    connections = connection_list(user=user)
    ids = [str(c.uid) for c in connections]
    since = timezone.now() - REFUSED_WINDOW
    deliveries: dict[str, dict[str, Any]] = {row["target_id"]: dict(row) for row in AuditEvent.objects.filter(target_type="mlflow_connection",
                                                                             target_id__in=ids).values("target_id")
                  .annotate(last=Max("timestamp", filter=Q(action=AuditAction.MLFLOW_WEBHOOK_RECEIVE.label)),
                            refused=Count("pk", filter=Q(action=AuditAction.MLFLOW_WEBHOOK_REFUSE.label,
                                                         timestamp__gte=since)),
                            last_refused=Max("timestamp", filter=Q(action=AuditAction.MLFLOW_WEBHOOK_REFUSE.label)))}
    counts: dict[int, dict[str, int]] = {}
    for row in MlflowSyncJob.objects.filter(connection__in=connections).values("connection_id", "status").annotate(
            n=Count("pk")):
        counts.setdefault(row["connection_id"], {})[row["status"]] = row["n"]
    overview = []
    for connection in connections:
        seen = deliveries.get(str(connection.uid), {})
        problems = list(connection.jobs.filter(status__in=PROBLEM_STATUSES).select_related("version__model")
                        .order_by("-updated_at")[:problems_per_connection])
        by_status = counts.get(connection.pk, {})
        overview.append({
            "connection": connection, "last_delivery": seen.get("last"), "refused_recently": seen.get("refused", 0),
            "last_refused": seen.get("last_refused"), "jobs": by_status,
            "imported": by_status.get(MlflowSyncStatus.DONE, 0) + by_status.get(MlflowSyncStatus.DUPLICATE, 0),
            "open": by_status.get(MlflowSyncStatus.PENDING, 0) + by_status.get(MlflowSyncStatus.RUNNING, 0),
            "problems": problems,
            "problem_count": sum(by_status.get(s, 0) for s in PROBLEM_STATUSES),
        })
    return overview
