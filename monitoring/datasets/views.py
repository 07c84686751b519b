"""Dataset pages: a model's snapshots, retraining policy and requests; one snapshot (progress, manifest, versions
trained on it, download); the compliance officer's list of versions trained on erased data."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import FileResponse, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.dateparse import parse_datetime
from django.views.decorators.http import require_GET, require_POST

from monitoring.datasets import retraining, selectors, services
from monitoring.models import RetrainingPolicy, SnapshotStatus
from portal.models import TeamWebhook
from portal.permissions import has_capability, require_capability
from registry import storage
from registry.models import Environment
from registry.versions import selectors as registry_selectors


def _messages(exc: ValidationError) -> str:
    return " ".join(exc.messages)


@login_required
@require_GET
def model_datasets(request: HttpRequest, name: str) -> HttpResponse:
    model = registry_selectors.model_get(user=request.user, name=name)
    policies = {p.environment: p for p in RetrainingPolicy.objects.filter(model=model).select_related("webhook")}
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return render(request, "monitoring/datasets/model.html", {
        "model": model, "snapshots": selectors.snapshot_list(user=request.user, model=model)[:100],
        "requests": [selectors.request_data(r) for r in selectors.request_list(model=model)],
        "environments": Environment.values, "policies": [(env, policies.get(env)) for env in Environment.values],
        "webhooks": TeamWebhook.objects.filter(team=model.team, active=True),
        "may_create": has_capability(request.user, "register_model"),
        "may_manage": has_capability(request.user, "manage_alerts"),
        "default_from": (now - dt.timedelta(days=7)).isoformat(), "default_to": now.isoformat()})


@login_required
@require_POST
def snapshot_create(request: HttpRequest, name: str) -> HttpResponse:
    model = registry_selectors.model_get(user=request.user, name=name, action="register_model")
    start, end = parse_datetime(request.POST.get("from", "")), parse_datetime(request.POST.get("to", ""))
    version = request.POST.get("version", "").strip()
    try:
        if start is None or end is None:
            raise ValidationError("Give the window as ISO times with a zone, such as 2026-11-20T00:00:00+00:00.")
        if not version.isdigit() and version:
            raise ValidationError("The version is a number (or empty for every version).")
        snapshot = services.snapshot_create(model=model, environment=registry_selectors.environment_param(
            request.POST.get("environment", "")), start=start, end=end, version=int(version) if version else None,
            labelled_only=request.POST.get("labelled_only") == "on", actor=request.user)
    except ValidationError as exc:
        messages.error(request, _messages(exc))
        return redirect("datasets:model", name=name)
    messages.success(request, "Snapshot asked for; a worker is writing it.")
    return redirect("datasets:snapshot", uid=snapshot.uid)


@login_required
@require_GET
def snapshot_page(request: HttpRequest, uid: Any) -> HttpResponse:
    snapshot = selectors.snapshot_get(user=request.user, uid=uid)
    return render(request, "monitoring/datasets/snapshot.html", {
        "snapshot": snapshot, "data": selectors.snapshot_data(snapshot),
        "running": snapshot.status in (SnapshotStatus.PENDING, SnapshotStatus.RUNNING),
        "may_download": has_capability(request.user, "download_artifact")})


@login_required
@require_GET
def snapshot_download(request: HttpRequest, uid: Any) -> HttpResponse | FileResponse:
    snapshot = selectors.snapshot_get(user=request.user, uid=uid, action="download_artifact")
    try:
        services.snapshot_read(snapshot=snapshot, actor=request.user, via="page")
    except ValidationError as exc:
        messages.error(request, _messages(exc))
        return redirect("datasets:snapshot", uid=uid)
    assert snapshot.blob is not None
    response = FileResponse(storage.stream_blob(snapshot.blob), as_attachment=True,
                            filename=f"{snapshot.model.name}-{snapshot.environment}-{snapshot.sha256[:12]}.parquet",
                            content_type="application/octet-stream")
    response["X-Content-SHA256"] = snapshot.sha256
    return response


def _int_or_none(raw: str) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ValidationError(f"{raw!r} is not a whole number.")
    return int(raw)


@login_required
@require_POST
def policy_set(request: HttpRequest, name: str, env: str) -> HttpResponse:
    model = registry_selectors.model_get(user=request.user, name=name, action="manage_alerts")
    try:
        registry_selectors.environment_param(env)
        floor = request.POST.get("accuracy_floor", "").strip()
        retraining.policy_set(
            model=model, environment=env, actor=request.user, webhook_id=_int_or_none(request.POST.get("webhook", "")),
            enabled=request.POST.get("enabled") == "on", on_drift=request.POST.get("on_drift") == "on",
            accuracy_floor=float(floor) if floor else None,
            schedule_hours=_int_or_none(request.POST.get("schedule_hours", "")),
            snapshot_days=_int_or_none(request.POST.get("snapshot_days", "")) or 7,
            labelled_only=request.POST.get("labelled_only") == "on")
        messages.success(request, f"Retraining policy for {env} saved.")
    except ValueError:
        messages.error(request, "The accuracy floor is a fraction between 0 and 1, such as 0.85.")
    except ValidationError as exc:
        messages.error(request, _messages(exc))
    return redirect("datasets:model", name=name)


@login_required
@require_POST
def request_close(request: HttpRequest, uid: Any) -> HttpResponse:
    item = selectors.request_get(user=request.user, uid=uid, action="manage_alerts")
    try:
        retraining.retraining_close(request=item, actor=request.user, reason=request.POST.get("reason", ""))
        messages.success(request, "Retraining request closed.")
    except ValidationError as exc:
        messages.error(request, _messages(exc))
    return redirect("datasets:model", name=item.model.name)


@login_required
@require_GET
def erased_data(request: HttpRequest) -> HttpResponse:
    require_capability(request.user, "manage_subjects")
    flags = selectors.flag_list(user=request.user)[:500]
    return render(request, "monitoring/datasets/erased_data.html", {"flags": [selectors.flag_data(f) for f in flags]})


@login_required
@require_POST
def erased_data_decide(request: HttpRequest, uid: Any) -> HttpResponse:
    require_capability(request.user, "manage_subjects")
    flag = selectors.flag_get(user=request.user, uid=uid)
    try:
        retraining.erased_data_decide(flag=flag, decision=request.POST.get("decision", ""),
                                    reason=request.POST.get("reason", ""), actor=request.user)
        messages.success(request, f"Decision recorded for {flag.version}.")
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, _messages(exc) if isinstance(exc, ValidationError) else str(exc))
    return redirect("datasets:erased-data")
