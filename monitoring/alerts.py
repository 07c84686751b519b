"""Alert rules, evaluated by beat over the last ``window_minutes`` of rollups for every environment that serves.

Rules (thresholds per model, ``monitoring.drift.DEFAULT_THRESHOLDS`` otherwise): input drift (one alert per model
and environment naming the drifted features; PSI at ``psi_warning`` → warning, at ``psi_alert`` → alert) and
prediction drift, error rate above ``error_rate_max``, latency p99 above
``latency_p99_ms`` and accuracy below ``accuracy_min`` once ``min_labelled`` predictions have ground truth.

An alert is one occurrence: while its condition keeps holding, later evaluations only update its value and
``last_seen_at`` (deduplicated by a partial unique constraint on the open alert of each rule and subject). When the
condition clears it resolves itself. Drift alerts have hysteresis, so that steady traffic whose PSI hovers about a
threshold does not open and close them over and over: one opens only at ``psi_alert``, stays open (as a warning)
while the PSI is at ``psi_warning`` or more, and resolves only once it has stayed below ``psi_warning`` for a whole
window (``window_minutes`` since it was last seen). People acknowledge or resolve it in the UI. Firing and resolving send email to
the team's data scientists and approvers and the team's webhooks (``alert.fired``, ``alert.resolved``); every state
change is an audit event, written in the transaction that makes it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from monitoring.drift import DEFAULT_THRESHOLDS
from monitoring.models import Alert, AlertStatus, Granularity, MonitoringSettings
from monitoring.rollups import bucket_start, percentile, rollups, version_spec
from monitoring.selectors import ONLINE_ROLES, _merge, accuracy_metrics, drift_report, thresholds_for
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.permissions import require_capability
from portal.tasks import send_email_task
from portal.webhooks import webhooks_notify
from registry.models import EnvironmentState


class AlertError(Exception):
    pass


@dataclass(frozen=True)
class Condition:
    kind: str
    subject: str
    severity: str
    value: float
    threshold: float
    message: str


def alert_target(alert: Alert) -> Target:
    return Target("alert", str(alert.uid), str(alert)[:255], alert.model.team.slug)


def conditions(model: Any, environment: str, *, now: dt.datetime | None = None) -> list[Condition]:
    """What holds now for one serving environment, from the minute rollups of the rule window."""
    now = now or timezone.now()
    thresholds = thresholds_for(model)
    start = bucket_start(now - dt.timedelta(minutes=int(thresholds["window_minutes"])), Granularity.MINUTE)
    rows = [r for r in rollups(model.name, environment, Granularity.MINUTE, start, now) if r.role in ONLINE_ROLES]
    if not rows:
        return []

    state = EnvironmentState.objects.select_related("champion__version").filter(
        model=model, environment=environment).first()
    champion = state.champion.version if state and state.champion else None
    window = _merge(rows)
    found: list[Condition] = []
    minutes = thresholds["window_minutes"]
    count = window["count"]
    if count >= 20 and thresholds.get("error_rate_max") is not None:
        rate = window["errors"] / count
        if rate > float(thresholds["error_rate_max"]):
            found.append(Condition("error_rate", "", "alert", rate, float(thresholds["error_rate_max"]),
                                   f"Error rate {rate:.1%} over the last {minutes} min (limit "
                                   f"{float(thresholds['error_rate_max']):.1%})."))
    p99 = percentile(window["data"].get("latency") or [], 0.99)
    if count >= 20 and p99 is not None and thresholds.get("latency_p99_ms") is not None:
        if p99 > float(thresholds["latency_p99_ms"]):
            found.append(Condition("latency", "", "alert", p99, float(thresholds["latency_p99_ms"]),
                                   f"Latency p99 {p99:.1f} ms over the last {minutes} min (limit "
                                   f"{float(thresholds['latency_p99_ms']):g} ms)."))
    if champion is not None:
        spec = version_spec(model.name, champion.number)
        data = _merge([r for r in rows if r.version == champion.number])["data"]
        report = drift_report(spec, data, thresholds)["drift"]
        drifted = sorted((f for f in report["features"] if f["status"] in ("warning", "alert")),
                         key=lambda f: -f["psi"])
        if drifted:  # one alert for the model's inputs, naming the worst features, not one per feature
            severity = "alert" if any(f["status"] == "alert" for f in drifted) else "warning"
            limit = float(thresholds["psi_alert"] if severity == "alert" else thresholds["psi_warning"])
            named = ", ".join(f"{f['feature']} ({f['psi']:.2f})" for f in drifted[:5])
            more = f" and {len(drifted) - 5} more" if len(drifted) > 5 else ""
            found.append(Condition("drift", "", severity, drifted[0]["psi"], limit,
                                   f"{len(drifted)} of {len(report['features'])} features drifted over the last "
                                   f"{minutes} min (PSI threshold {limit:g}): {named}{more}."))
        p = report["prediction"]
        if p and p["status"] in ("warning", "alert"):
            limit = thresholds["psi_alert"] if p["status"] == "alert" else thresholds["psi_warning"]
            found.append(Condition("prediction_drift", "", "alert" if p["status"] == "alert" else "warning",
                                   p["psi"], float(limit), f"Predictions drifted from the reference's "
                                   f"{p['feature']}: PSI {p['psi']:.3f} (threshold {float(limit):g})."))
        floor = thresholds.get("accuracy_min")
        if floor is None and isinstance((champion.metrics or {}).get("accuracy"), int | float):
            floor = float(champion.metrics["accuracy"]) - 0.05
        truth = data.get("truth")
        metrics = accuracy_metrics(truth, spec.task)
        if (floor is not None and metrics.get("accuracy") is not None
                and metrics["labelled"] >= int(thresholds["min_labelled"]) and metrics["accuracy"] < float(floor)):
            found.append(Condition("accuracy", "", "alert", metrics["accuracy"], float(floor),
                                   f"Accuracy {metrics['accuracy']:.3f} on {metrics['labelled']} predictions with "
                                   f"ground truth (floor {float(floor):.3f})."))
        drifted_attribution = _attribution_condition(model, environment, champion.number, thresholds, now=now)
        if drifted_attribution is not None:
            found.append(drifted_attribution)
    return found


def _attribution_condition(model: Any, environment: str, version: int, thresholds: dict[str, Any], *,
                           now: dt.datetime | None) -> Condition | None:
    """``attr_drift``: the latest attribution-drift measurement of the serving version (taken within two windows)
    at or above ``attribution_drift_max``, naming the features whose share moved most."""
    from monitoring.attribution import latest

    limit = thresholds.get("attribution_drift_max")
    record = latest(model, environment, version)
    window = dt.timedelta(minutes=2 * int(thresholds["window_minutes"]))
    if limit is None or record is None or record.distance is None or \
            record.measured_at < (now or timezone.now()) - window or record.distance < float(limit):
        return None
    moved = sorted(set(record.production) | set(record.reference),
                   key=lambda n: -abs(record.production.get(n, 0.0) - record.reference.get(n, 0.0)))[:3]
    named = ", ".join(f"{n} {record.reference.get(n, 0.0):.0%} → {record.production.get(n, 0.0):.0%}" for n in moved)
    return Condition("attr_drift", "", "alert", record.distance, float(limit),
                     f"Attribution drift {record.distance:.2f} (threshold {float(limit):g}) over {record.rows} "
                     f"production rows of v{version}: share of attribution {named}.")


def evaluate_alerts(*, now: dt.datetime | None = None) -> dict[str, int]:
    """Fire, update and resolve alerts for every serving environment; returns what changed."""
    now = now or timezone.now()
    changed = {"fired": 0, "resolved": 0, "updated": 0}
    for state in EnvironmentState.objects.select_related("model__team").filter(champion__isnull=False):
        holding = {(c.kind, c.subject): c for c in conditions(state.model, state.environment, now=now)}
        open_alerts = {(a.kind, a.subject): a for a in Alert.objects.filter(
            model=state.model, environment=state.environment).exclude(status=AlertStatus.RESOLVED)}
        for key, condition in holding.items():
            alert = open_alerts.get(key)
            if alert is None:
                if condition.kind in HYSTERESIS_KINDS and condition.severity != "alert":
                    continue  # drift opens at psi_alert only; between the thresholds it only keeps one open
                if _fire(state.model, state.environment, condition, now=now):
                    changed["fired"] += 1
            else:
                Alert.objects.filter(pk=alert.pk).update(value=condition.value, last_seen_at=now,
                                                         severity=condition.severity, message=condition.message)
                changed["updated"] += 1
        window = dt.timedelta(minutes=int(thresholds_for(state.model)["window_minutes"]))
        for key, alert in open_alerts.items():
            if key in holding:
                continue
            if alert.kind in HYSTERESIS_KINDS and now - alert.last_seen_at < window:
                continue  # below psi_warning, but not yet for a whole window
            _resolve(alert, actor=None, resolution="The condition cleared." if alert.kind not in HYSTERESIS_KINDS
                     else f"PSI stayed below the warning threshold for {int(window.total_seconds() // 60)} min.")
            changed["resolved"] += 1
    return changed


HYSTERESIS_KINDS = frozenset({"drift", "prediction_drift"})


def _fire(model: Any, environment: str, condition: Condition, *, now: dt.datetime) -> Alert | None:
    try:
        with transaction.atomic():
            alert = Alert.objects.create(model=model, environment=environment, kind=condition.kind,
                                         subject=condition.subject, severity=condition.severity,
                                         value=condition.value, threshold=condition.threshold,
                                         message=condition.message, opened_at=now, last_seen_at=now)
            audit_record(AuditAction.ALERT_FIRE, actor=None, target=alert_target(alert),
                         after={"status": alert.status, "severity": alert.severity, "value": alert.value,
                                "threshold": alert.threshold, "message": alert.message})
            _notify(alert, "alert.fired")
    except IntegrityError:  # another evaluator opened the same alert first
        return None
    return alert


def _resolve(alert: Alert, *, actor: Any, resolution: str) -> None:
    with transaction.atomic():
        before = alert.status
        updated = Alert.objects.filter(pk=alert.pk).exclude(status=AlertStatus.RESOLVED).update(
            status=AlertStatus.RESOLVED, resolved_at=timezone.now(), resolution=resolution[:2000],
            resolved_by=actor if getattr(actor, "is_authenticated", False) else None)
        if not updated:
            raise AlertError("This alert is already resolved.")
        alert.refresh_from_db()
        audit_record(AuditAction.ALERT_RESOLVE, actor=actor, target=alert_target(alert),
                     before={"status": before}, after={"status": alert.status, "resolution": alert.resolution})
        _notify(alert, "alert.resolved")


def alert_acknowledge(*, alert: Alert, actor: Any, comment: str = "") -> Alert:
    with transaction.atomic():
        updated = Alert.objects.filter(pk=alert.pk, status=AlertStatus.FIRING).update(
            status=AlertStatus.ACKNOWLEDGED, acknowledged_by=actor, acknowledged_at=timezone.now())
        if not updated:
            raise AlertError("Only a firing alert can be acknowledged; this one is "
                             f"{Alert.objects.get(pk=alert.pk).get_status_display().lower()}.")
        audit_record(AuditAction.ALERT_ACKNOWLEDGE, actor=actor, target=alert_target(alert),
                     before={"status": AlertStatus.FIRING}, after={"status": AlertStatus.ACKNOWLEDGED},
                     metadata={"comment": comment[:1000]} if comment else None)
    alert.refresh_from_db()
    return alert


def alert_resolve(*, alert: Alert, actor: Any, resolution: str) -> Alert:
    if not resolution.strip():
        raise AlertError("Say how it was resolved (a sentence is enough).")
    _resolve(alert, actor=actor, resolution=resolution.strip())
    alert.refresh_from_db()
    return alert


def _recipients(model: Any) -> list[str]:
    users = get_user_model().objects.filter(
        Q(groups__permissions__codename="manage_alerts") | Q(is_superuser=True), is_active=True,
        memberships__team=model.team).exclude(email="").distinct()
    return sorted({u.email for u in users})


def _notify(alert: Alert, event: str) -> None:
    """Email and signed webhooks, sent once the transaction commits."""
    link = settings.PORTAL_BASE_URL + reverse("monitoring:model", args=[alert.model.name, alert.environment])
    state = "firing" if event == "alert.fired" else "resolved"
    subject = f"[{alert.severity}] {alert.model.name} {alert.environment}: {alert.kind.replace('_', ' ')} {state}"
    body = f"{alert.message}\n\nStatus: {state}.\n{alert.resolution}\n\nMonitoring: {link}\n"
    recipients = _recipients(alert.model)
    if recipients:
        transaction.on_commit(lambda: send_email_task.delay(subject, body, recipients))
    webhooks_notify(team=alert.model.team, event=event, payload={
        "event": event, "alert": str(alert.uid), "model": alert.model.name, "environment": alert.environment,
        "kind": alert.kind, "subject": alert.subject, "severity": alert.severity, "status": alert.status,
        "value": alert.value, "threshold": alert.threshold, "message": alert.message, "url": link})


THRESHOLD_LIMITS: dict[str, tuple[float, float]] = {
    "psi_warning": (0.0, 100.0), "psi_alert": (0.0, 100.0), "min_rows": (1, 10_000_000),
    "error_rate_max": (0.0, 1.0), "latency_p99_ms": (0.01, 600_000.0), "accuracy_min": (0.0, 1.0),
    "min_labelled": (1, 10_000_000), "window_minutes": (5, 7 * 24 * 60), "attribution_drift_max": (0.01, 1.0),
}
INTEGER_THRESHOLDS = {"min_rows", "min_labelled", "window_minutes"}


def clean_thresholds(raw: Any) -> dict[str, Any]:
    """Validate a thresholds object; unknown names, wrong types and values out of range are refused with the name."""
    if not isinstance(raw, dict):
        raise AlertError("Thresholds are a JSON object, e.g. {\"psi_alert\": 0.3}.")
    cleaned: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in THRESHOLD_LIMITS:
            raise AlertError(f"Unknown threshold {str(name)[:40]!r}; known: {', '.join(THRESHOLD_LIMITS)}.")
        if value is None and name in ("accuracy_min", "latency_p99_ms", "error_rate_max"):
            cleaned[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AlertError(f"{name} must be a number.")
        low, high = THRESHOLD_LIMITS[name]
        if not low <= value <= high:
            raise AlertError(f"{name} must be between {low:g} and {high:g}.")
        cleaned[name] = int(value) if name in INTEGER_THRESHOLDS else float(value)
    merged = {**thresholds_defaults(), **cleaned}
    if merged["psi_warning"] > merged["psi_alert"]:
        raise AlertError("psi_warning must not be above psi_alert.")
    return cleaned


def thresholds_defaults() -> dict[str, Any]:
    return dict(DEFAULT_THRESHOLDS)


def monitoring_settings_change(*, model: Any, thresholds: Any, target_column: str | None, actor: Any) -> Any:
    """Replace a model's thresholds (and optionally its target column); audited with before and after."""
    require_capability(actor, "manage_alerts")
    cleaned = clean_thresholds(thresholds)
    if target_column is not None and len(target_column) > 200:
        raise AlertError("target_column has at most 200 characters.")
    with transaction.atomic():
        row, _created = MonitoringSettings.objects.select_for_update().get_or_create(model=model)
        before = {"thresholds": row.thresholds, "target_column": row.target_column}
        row.thresholds = cleaned
        if target_column is not None:
            row.target_column = target_column.strip()
        row.save()
        audit_record(AuditAction.MONITORING_SETTINGS_CHANGE, actor=actor,
                     target=Target("registeredmodel", str(model.pk), model.name, model.team.slug),
                     before=before, after={"thresholds": row.thresholds, "target_column": row.target_column})
    return row
