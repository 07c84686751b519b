"""Dataset snapshots, retraining and lineage (reads): permission-aware fetches and the shapes the API and pages
show."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.urls import reverse

from monitoring.models import (
    DatasetSnapshot,
    ErasedDataFlag,
    RetrainingPolicy,
    RetrainingRequest,
    TrainingLink,
)
from portal.permissions import get_object_for_user, scope_to_teams


def snapshot_get(*, user: Any, uid: Any, action: str | None = None) -> DatasetSnapshot:
    return get_object_for_user(user, DatasetSnapshot.objects.select_related("model__team", "created_by", "blob"),
                               action=action, uid=uid)


def snapshot_list(*, user: Any, model: Any = None) -> QuerySet[DatasetSnapshot]:
    qs = scope_to_teams(DatasetSnapshot.objects.select_related("model__team", "created_by"), user)
    return qs.filter(model=model) if model is not None else qs


def snapshot_data(snapshot: DatasetSnapshot, *, detail: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": str(snapshot.uid), "model": snapshot.model.name, "environment": snapshot.environment,
        "version": snapshot.version, "from": snapshot.window_start, "to": snapshot.window_end,
        "labelled_only": snapshot.labelled_only, "status": snapshot.status, "progress": snapshot.progress,
        "rows_done": snapshot.rows_done, "rows_expected": snapshot.rows_expected,
        "chunks_done": snapshot.chunks_done, "sha256": snapshot.sha256 or None, "size": snapshot.size or None,
        "error": snapshot.error, "created_by": snapshot.created_by.get_username() if snapshot.created_by else None,
        "created_at": snapshot.created_at, "finished_at": snapshot.finished_at,
        "download_url": reverse("datasets_api:dataset-download", args=[snapshot.uid]),
    }
    if detail:
        data["manifest"] = snapshot.manifest
        data["trained_versions"] = trained_versions(snapshot)
    return data


def trained_versions(snapshot: DatasetSnapshot) -> list[dict[str, Any]]:
    return [{"model": link.version.model.name, "version": link.version.number, "trained_on_sha256":
             link.snapshot_sha256, "registered_at": link.created_at,
             "url": reverse("registry:version", args=[link.version.model.name, link.version.number])}
            for link in TrainingLink.objects.filter(snapshot=snapshot).select_related("version__model").order_by(
                "version__model__name", "version__number")]


def version_lineage(version: Any) -> dict[str, Any]:
    links = TrainingLink.objects.filter(version=version).select_related("snapshot__model")
    flags = ErasedDataFlag.objects.filter(version=version).select_related("snapshot", "decided_by")
    return {
        "trained_on": [{"snapshot": str(link.snapshot.uid), "model": link.snapshot.model.name,
                        "environment": link.snapshot.environment, "sha256": link.snapshot_sha256,
                        "current_sha256": link.snapshot.sha256, "rows": link.snapshot.manifest.get("rows"),
                        "url": reverse("datasets:snapshot", args=[link.snapshot.uid])} for link in links],
        "trained_on_erased_data": any(not f.decision for f in flags),
        "erased_data": [flag_data(f) for f in flags],
    }


def flag_data(flag: ErasedDataFlag) -> dict[str, Any]:
    return {"id": str(flag.uid), "model": flag.version.model.name, "version": flag.version.number,
            "snapshot": str(flag.snapshot.uid), "erasure_receipt_seq": flag.erasure_seq,
            "erasure_receipt_hash": flag.erasure_hash, "rows_removed": flag.rows_removed,
            "flagged_at": flag.flagged_at, "decision": flag.decision or "pending", "reason": flag.reason,
            "decided_by": flag.decided_by.get_username() if flag.decided_by else None, "decided_at": flag.decided_at}


def flag_list(*, user: Any, pending_only: bool = False) -> QuerySet[ErasedDataFlag]:
    qs = scope_to_teams(ErasedDataFlag.objects.select_related("version__model__team", "snapshot", "decided_by"), user)
    return qs.filter(decision="") if pending_only else qs


def flag_get(*, user: Any, uid: Any, action: str | None = None) -> ErasedDataFlag:
    return get_object_for_user(user, ErasedDataFlag.objects.select_related("version__model__team", "snapshot"),
                               action=action, uid=uid)


def request_get(*, user: Any, uid: Any, action: str | None = None) -> RetrainingRequest:
    return get_object_for_user(user, RetrainingRequest.objects.select_related("model__team", "snapshot"),
                               action=action, uid=uid)


def request_data(request: RetrainingRequest) -> dict[str, Any]:
    delivery = request.delivery
    return {"id": str(request.uid), "model": request.model.name, "environment": request.environment,
            "trigger": request.trigger, "reason": request.reason, "status": request.status,
            "status_text": request.get_status_display(), "error": request.error, "created_at": request.created_at,
            "closed_at": request.closed_at, "snapshot": str(request.snapshot.uid) if request.snapshot else None,
            "snapshot_status": request.snapshot.status if request.snapshot else None,
            "ci_call": None if delivery is None else {
                "status": delivery.status, "attempts": delivery.attempts, "http_status": delivery.response_status,
                "error": delivery.error, "last_attempt_at": delivery.last_attempt_at}}


def request_list(*, model: Any, limit: int = 50) -> list[RetrainingRequest]:
    return list(RetrainingRequest.objects.filter(model=model).select_related("snapshot", "delivery", "model")
                .order_by("-created_at")[:limit])


def policy_data(policy: RetrainingPolicy | None) -> dict[str, Any] | None:
    if policy is None:
        return None
    return {"environment": policy.environment, "enabled": policy.enabled, "on_drift": policy.on_drift,
            "accuracy_floor": policy.accuracy_floor, "accuracy_window_minutes": policy.accuracy_window_minutes,
            "accuracy_min_labelled": policy.accuracy_min_labelled, "schedule_hours": policy.schedule_hours,
            "snapshot_days": policy.snapshot_days, "labelled_only": policy.labelled_only,
            "webhook": policy.webhook_id, "webhook_url": policy.webhook.url if policy.webhook else None,
            "updated_at": policy.updated_at}
