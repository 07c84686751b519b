"""Retraining triggers: per model and environment a policy (an open drift alert, accuracy under a floor over a window,
a schedule) opens a retraining request, which cuts a snapshot and then calls the team's CI through its signed
webhook (``portal.webhooks``: the delivery log, SSRF rules, retries with backoff) with the snapshot's URL and a
short-lived token that downloads that snapshot and nothing else.

At most one request is open per model and environment (a partial unique constraint), so a condition that holds for
hours asks once. Everything runs in beat and workers, never on the serving path: a CI that fails is retried by the
delivery machinery, shown on the model page, and serving never waits for it.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.dispatch import receiver
from django.urls import reverse
from django.utils import timezone

from monitoring.datasets.cut import snapshot_finished
from monitoring.datasets.services import request_target, snapshot_create, token_issue
from monitoring.models import (
    OPEN_RETRAINING,
    Alert,
    AlertStatus,
    DatasetSnapshot,
    ErasedDataFlag,
    Granularity,
    RetrainingPolicy,
    RetrainingRequest,
    RetrainingStatus,
    SnapshotStatus,
)
from monitoring.rollups import bucket_start, rollups, version_spec
from monitoring.selectors import ONLINE_ROLES, _merge, accuracy_metrics
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import AuditOutcome, TeamWebhook, WebhookDelivery
from portal.permissions import require_capability
from portal.webhooks import deliveries_queued
from registry.models import EnvironmentState

EVENT = "retraining.requested"
RETRY_FAILED_AFTER = dt.timedelta(hours=1)  # a failed request is not asked again for the same trigger before this


# --- Policies -----------------------------------------------------------------------------------------------------

POLICY_FIELDS = ("enabled", "on_drift", "accuracy_floor", "accuracy_window_minutes", "accuracy_min_labelled",
                 "schedule_hours", "snapshot_days", "labelled_only")


def policy_set(*, model: Any, environment: str, actor: Any, webhook_id: int | None, **values: Any) -> RetrainingPolicy:
    require_capability(actor, "manage_alerts")
    floor = values.get("accuracy_floor")
    if floor is not None and not 0 <= float(floor) <= 1:
        raise ValidationError({"accuracy_floor": "Give a fraction between 0 and 1, such as 0.85."})
    if values.get("schedule_hours") is not None and not 1 <= int(values["schedule_hours"]) <= 24 * 366:
        raise ValidationError({"schedule_hours": "Give a number of hours from 1 to 8784."})
    if not 1 <= int(values.get("snapshot_days", 7)) <= 366:
        raise ValidationError({"snapshot_days": "Give a number of days from 1 to 366."})
    webhook = None
    if webhook_id is not None:
        webhook = TeamWebhook.objects.filter(pk=webhook_id, team=model.team).first()
        if webhook is None:
            raise ValidationError({"webhook": "No webhook of this model's team has that id (an administrator adds the "
                                              "CI's receiver under the team's webhooks)."})
    with transaction.atomic():
        policy = RetrainingPolicy.objects.select_for_update().filter(model=model, environment=environment).first()
        before = {f: getattr(policy, f) for f in POLICY_FIELDS} | {"webhook": policy.webhook_id} if policy else None
        if policy is None:
            policy = RetrainingPolicy(model=model, environment=environment)
        for key in POLICY_FIELDS:
            if key in values:
                setattr(policy, key, values[key])
        policy.webhook, policy.updated_by, policy.updated_at = webhook, actor, timezone.now()
        policy.save()
        audit_record(AuditAction.RETRAIN_POLICY_CHANGE, actor=actor,
                     target=Target("environment", f"{model.name}/{environment}", f"{model.name} {environment}",
                                   model.team.slug),
                     before=before, after={f: getattr(policy, f) for f in POLICY_FIELDS} | {"webhook": webhook_id})
    return policy


# --- Requests -----------------------------------------------------------------------------------------------------

def retraining_open(*, model: Any, environment: str, trigger: str, reason: str, actor: Any = None,
                    policy: RetrainingPolicy | None = None, alert: Alert | None = None,
                    now: dt.datetime | None = None) -> RetrainingRequest | None:
    """Open a request and ask for its snapshot; None when one is already open. A snapshot that cannot be cut (no
    prediction in the window, no ground truth) leaves the request failed with that message."""
    now = now or timezone.now()
    policy = policy or RetrainingPolicy.objects.filter(model=model, environment=environment).first()
    days = policy.snapshot_days if policy else 7
    labelled_only = policy.labelled_only if policy else True
    try:
        with transaction.atomic():
            request = RetrainingRequest.objects.create(model=model, environment=environment, policy=policy,
                                                       trigger=trigger, reason=reason[:2000], alert=alert,
                                                       created_at=now)
            audit_record(AuditAction.RETRAIN_REQUEST, actor=actor, target=request_target(request),
                         after={"trigger": trigger, "reason": reason[:2000],
                                "alert": str(alert.uid) if alert else None, "snapshot_days": days})
    except IntegrityError:
        return None  # one is open already (the partial unique constraint)
    try:
        snapshot = snapshot_create(model=model, environment=environment, start=now - dt.timedelta(days=days),
                                   end=now, actor=actor, labelled_only=labelled_only, check_capability=False)
    except ValidationError as exc:
        message = " ".join(m for m in exc.messages)
        _fail(request, f"The snapshot could not be cut: {message}")
        return request
    RetrainingRequest.objects.filter(pk=request.pk).update(snapshot=snapshot)
    request.snapshot = snapshot
    return request


def _fail(request: RetrainingRequest, message: str) -> None:
    with transaction.atomic():
        RetrainingRequest.objects.filter(pk=request.pk).update(status=RetrainingStatus.FAILED, error=message[:2000],
                                                               closed_at=timezone.now())
        request.status, request.error = RetrainingStatus.FAILED, message[:2000]
        audit_record(AuditAction.RETRAIN_FAIL, actor=None, target=request_target(request),
                     outcome=AuditOutcome.FAILURE, after={"status": "failed", "error": message[:2000]})


def snapshot_url(snapshot: DatasetSnapshot) -> str:
    return settings.PORTAL_BASE_URL + reverse("datasets_api:dataset-download", args=[snapshot.uid])


@receiver(snapshot_finished, dispatch_uid="monitoring.datasets.retraining.on_snapshot_done")
def _snapshot_finished(*, snapshot: DatasetSnapshot, **_: Any) -> None:
    on_snapshot_done(snapshot)


def on_snapshot_done(snapshot: DatasetSnapshot) -> None:
    """Inside the transaction that finishes a snapshot: call CI for the requests waiting on it (or fail them)."""
    for request in RetrainingRequest.objects.select_for_update(of=("self",)).select_related(
            "policy__webhook", "model__team").filter(
            snapshot=snapshot, status=RetrainingStatus.CUTTING):
        if snapshot.status != SnapshotStatus.READY:
            _fail(request, f"The snapshot failed: {snapshot.error}")
            continue
        hook = request.policy.webhook if request.policy else None
        if hook is None or not hook.active:
            _fail(request, "The snapshot is ready, but the policy names no active CI webhook to call; set one on the "
                           "model's datasets page.")
            continue
        token, plaintext = token_issue(snapshot=snapshot)
        payload = {
            "event": EVENT, "request": str(request.uid), "model": request.model.name,
            "environment": request.environment, "trigger": request.trigger, "reason": request.reason,
            "snapshot": {"id": str(snapshot.uid), "sha256": snapshot.sha256, "rows": snapshot.manifest.get("rows"),
                         "url": snapshot_url(snapshot), "manifest": snapshot.manifest},
            # Read-only, this snapshot only, short-lived: Authorization: Bearer <token> on the url above.
            "token": plaintext, "token_expires_at": token.expires_at.isoformat(),
        }
        delivery = WebhookDelivery.objects.create(webhook=hook, event=EVENT, payload=payload)
        RetrainingRequest.objects.filter(pk=request.pk).update(status=RetrainingStatus.CALLING, delivery=delivery)
        audit_record(AuditAction.RETRAIN_CALL, actor=None, target=request_target(request),
                     after={"status": "calling", "snapshot": str(snapshot.uid), "sha256": snapshot.sha256,
                            "webhook": hook.pk, "delivery": str(delivery.uid), "token": str(token.uid),
                            "token_expires_at": token.expires_at.isoformat()})
        transaction.on_commit(functools.partial(deliveries_queued.send, sender=WebhookDelivery,
                                                delivery_ids=[delivery.pk]))


def retraining_sync() -> int:
    """Follow the CI calls: delivered → called; failed for good → the request fails with the receiver's answer."""
    changed = 0
    for request in RetrainingRequest.objects.select_related("delivery", "model__team").filter(
            status=RetrainingStatus.CALLING, delivery__isnull=False):
        delivery = request.delivery
        assert delivery is not None
        if delivery.status == WebhookDelivery.Status.DELIVERED:
            with transaction.atomic():
                if RetrainingRequest.objects.filter(pk=request.pk, status=RetrainingStatus.CALLING).update(
                        status=RetrainingStatus.CALLED):
                    audit_record(AuditAction.RETRAIN_CALL, actor=None, target=request_target(request),
                                 after={"status": "called", "http_status": delivery.response_status,
                                        "attempts": delivery.attempts})
                    changed += 1
        elif delivery.status == WebhookDelivery.Status.FAILED:
            _fail(request, f"CI was not reached after {delivery.attempts} attempt(s): {delivery.error}")
            changed += 1
    return changed


def retraining_close(*, request: RetrainingRequest, actor: Any, reason: str) -> RetrainingRequest:
    require_capability(actor, "manage_alerts")
    if not reason.strip():
        raise ValidationError({"reason": "Say why it is closed (a sentence is enough)."})
    with transaction.atomic():
        if not RetrainingRequest.objects.filter(pk=request.pk, status__in=OPEN_RETRAINING).update(
                status=RetrainingStatus.CLOSED, closed_at=timezone.now(), error=""):
            raise ValidationError({"request": "Only an open request can be closed."})
        audit_record(AuditAction.RETRAIN_CLOSE, actor=actor, target=request_target(request),
                     before={"status": request.status}, after={"status": "closed", "reason": reason.strip()[:2000]})
    request.refresh_from_db()
    return request


def retraining_for_erasure(*, flag: ErasedDataFlag, actor: Any) -> RetrainingRequest | None:
    """A compliance officer asked to retrain a version trained on erased data: through the model's policy (where it
    serves first), if it has one. The snapshot is cut after commit by a worker; the decision is recorded either way."""
    model = flag.version.model
    policy = RetrainingPolicy.objects.filter(model=model, enabled=True).order_by("environment").first()
    if policy is None:
        return None
    with transaction.atomic():  # a savepoint: an already open request must not undo the decision's transaction
        return retraining_open(model=model, environment=policy.environment, trigger="erasure", policy=policy,
                               actor=actor, reason=f"{flag.version} was trained on snapshot {flag.snapshot.uid}, from "
                                                   f"which erasure receipt #{flag.erasure_seq} removed rows.")


# --- Versions trained on erased data ------------------------------------------------------------------------

def erased_data_decide(*, flag: ErasedDataFlag, decision: str, reason: str, actor: Any) -> ErasedDataFlag:
    """A compliance officer's decision on a version trained on erased data: retrain (a retraining request is opened
    where the model has a policy) or keep, with a reason. Once decided, the version is no longer flagged."""
    require_capability(actor, "manage_subjects")
    reason = (reason or "").strip()
    if decision not in (ErasedDataFlag.Decision.RETRAIN, ErasedDataFlag.Decision.KEEP):
        raise ValidationError({"decision": "Say retrain or keep."})
    if decision == ErasedDataFlag.Decision.KEEP and len(reason) < 10:
        raise ValidationError({"reason": "Keeping a version trained on erased data needs a reason (10 characters "
                                         "or more)."})
    with transaction.atomic():
        locked = ErasedDataFlag.objects.select_for_update().select_related("version__model__team", "snapshot").get(
            pk=flag.pk)
        if locked.decision:
            raise ValidationError({"decision": f"Already decided ({locked.get_decision_display().lower()}) by "
                                               f"{locked.decided_by.get_username() if locked.decided_by else 'someone'}."})
        opened = None
        if decision == ErasedDataFlag.Decision.RETRAIN:
            opened = retraining_for_erasure(flag=locked, actor=actor)
        ErasedDataFlag.objects.filter(pk=locked.pk).update(decision=decision, reason=reason[:2000], decided_by=actor,
                                                           decided_at=timezone.now())
        locked.refresh_from_db()
        version = locked.version
        audit_record(AuditAction.VERSION_ERASED_DATA_DECISION, actor=actor,
                     target=Target("modelversion", str(version.uid), str(version), version.model.team.slug),
                     before={"decision": "pending"},
                     after={"decision": decision, "reason": reason[:2000], "snapshot": str(locked.snapshot.uid),
                            "erasure_receipt_seq": locked.erasure_seq,
                            "retraining_request": str(opened.uid) if opened is not None else None})
    return locked


# --- Triggers (beat) ------------------------------------------------------------------------------------------

def _accuracy_below(policy: RetrainingPolicy, now: dt.datetime) -> str | None:
    state = EnvironmentState.objects.select_related("champion__version").filter(
        model=policy.model, environment=policy.environment).first()
    if policy.accuracy_floor is None or state is None or state.champion is None:
        return None
    start = bucket_start(now - dt.timedelta(minutes=policy.accuracy_window_minutes), Granularity.MINUTE)
    number = state.champion.version.number
    rows = [r for r in rollups(policy.model.name, policy.environment, Granularity.MINUTE, start, now)
            if r.role in ONLINE_ROLES and r.version == number]
    if not rows:
        return None
    metrics = accuracy_metrics(_merge(rows)["data"].get("truth"), version_spec(policy.model.name, number).task)
    accuracy = metrics.get("accuracy")
    if accuracy is None or metrics["labelled"] < policy.accuracy_min_labelled or accuracy >= policy.accuracy_floor:
        return None
    return (f"Accuracy {accuracy:.3f} on {metrics['labelled']} predictions with ground truth over the last "
            f"{policy.accuracy_window_minutes} min is under the floor {policy.accuracy_floor:.3f}.")


def _recently_failed(policy: RetrainingPolicy, trigger: str, now: dt.datetime) -> bool:
    return RetrainingRequest.objects.filter(model=policy.model, environment=policy.environment, trigger=trigger,
                                            status=RetrainingStatus.FAILED,
                                            created_at__gt=now - RETRY_FAILED_AFTER).exists()


def retraining_evaluate(*, now: dt.datetime | None = None) -> dict[str, int]:
    """Follow CI calls, then open a request for every enabled policy whose trigger holds and that has none open."""
    now = now or timezone.now()
    done = {"synced": retraining_sync(), "opened": 0}
    open_now = set(RetrainingRequest.objects.filter(status__in=OPEN_RETRAINING).values_list("model_id",
                                                                                            "environment"))
    for policy in RetrainingPolicy.objects.select_related("model__team").filter(enabled=True):
        if (policy.model_id, policy.environment) in open_now:
            continue
        found: tuple[str, str, Alert | None] | None = None
        if policy.on_drift:
            alert = Alert.objects.filter(model=policy.model, environment=policy.environment,
                                         kind__in=("drift", "prediction_drift")).exclude(
                status=AlertStatus.RESOLVED).order_by("opened_at").first()
            if alert is not None and not RetrainingRequest.objects.filter(alert=alert).exists():
                found = ("drift", f"Drift alert: {alert.message}", alert)
        if found is None:
            reason = _accuracy_below(policy, now)
            if reason:
                found = ("accuracy", reason, None)
        if found is None and policy.schedule_hours:
            last = RetrainingRequest.objects.filter(model=policy.model, environment=policy.environment).exclude(
                status=RetrainingStatus.FAILED).order_by("-created_at").values_list("created_at", flat=True).first()
            if last is None or now - last >= dt.timedelta(hours=policy.schedule_hours):
                found = ("schedule", f"Scheduled: every {policy.schedule_hours} h.", None)
        if found is None or _recently_failed(policy, found[0], now):
            continue
        if retraining_open(model=policy.model, environment=policy.environment, trigger=found[0], reason=found[1],
                           policy=policy, alert=found[2], now=now) is not None:
            done["opened"] += 1
    return done

