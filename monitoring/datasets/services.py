"""Dataset snapshots (writes): asking for one, reading one (every read is an audit event), the read-only tokens a
retraining call carries, lineage (``trained_on``) and the compliance officer's decision on a version trained on
erased data."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.dispatch import Signal
from django.utils import timezone

from monitoring.datasets.cut import ROLES, snapshot_target, window_rows
from monitoring.models import (
    OPEN_RETRAINING,
    DatasetAccessToken,
    DatasetSnapshot,
    RetrainingRequest,
    RetrainingStatus,
    SensitiveTreatment,
    SnapshotStatus,
    TrainingLink,
)
from portal import context
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import AuditOutcome
from portal.permissions import require_capability, scope_to_teams
from registry.models import ModelVersion

TOKEN_PREFIX = "mld_"  # noqa: S105 - the public prefix of dataset tokens, not a secret
MAX_WINDOW_DAYS = 366
TREATMENTS = {t.value for t in SensitiveTreatment}


def _window(start: dt.datetime, end: dt.datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValidationError({"from": "Give times with a time zone, such as 2026-11-20T00:00:00Z."})
    if end <= start:
        raise ValidationError({"to": "The window is empty: 'to' must be later than 'from'."})
    if end - start > dt.timedelta(days=MAX_WINDOW_DAYS):
        raise ValidationError({"to": f"A snapshot covers at most {MAX_WINDOW_DAYS} days."})


def snapshot_create(*, model: Any, environment: str, start: dt.datetime, end: dt.datetime, actor: Any,
                    version: int | None = None, labelled_only: bool = True,
                    sensitive: dict[str, str] | None = None, check_capability: bool = True) -> DatasetSnapshot:
    """Ask for a snapshot; a worker writes it. Refused with a clear message when the window holds no prediction, or
    (``labelled_only``) none with ground truth. ``actor`` None: a retraining policy asked."""
    if check_capability:
        require_capability(actor, "register_model")
    _window(start, end)
    treatment = dict(sensitive or {})
    for column, how in treatment.items():
        if how not in TREATMENTS:
            raise ValidationError({"sensitive": f"column {column!r}: say dropped, masked or encrypted."})
    if version is not None and not ModelVersion.objects.filter(model=model, number=version).exists():
        raise ValidationError({"version": f"{model.name} has no version {version}."})
    where = f"{model.name} in {environment}" + (f" (version {version})" if version else "")
    span = f"between {start.isoformat()} and {end.isoformat()}"
    rows = window_rows(model_name=model.name, environment=environment, version=version, start=start, end=end)
    if not rows.exists():
        raise ValidationError({"window": f"No predictions of {where} were logged {span} (or their inputs were "
                                         "erased or purged): there is nothing to cut."})
    if labelled_only:
        labelled = window_rows(model_name=model.name, environment=environment, version=version, start=start, end=end,
                               labelled_only=True)
        if not labelled.exists():
            raise ValidationError({"window": f"None of the predictions of {where} logged {span} has ground truth yet. "
                                             "Send it to POST /api/v1/serve/{name}/{env}/feedback first, or ask for "
                                             "the inputs without labels (labelled_only=false)."})
        rows = labelled
    expected = rows.count()
    versions = sorted(set(rows.values_list("version", flat=True).distinct().order_by()))
    unknown = sorted(set(treatment) - _sensitive_names(model, versions))
    if unknown:
        raise ValidationError({"sensitive": f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not marked "
                                            "sensitive in the versions of the window."})
    with transaction.atomic():
        snapshot = DatasetSnapshot.objects.create(
            model=model, environment=environment, version=version, window_start=start, window_end=end,
            labelled_only=labelled_only, sensitive_treatment=treatment, rows_expected=expected,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
            manifest={"snapshot": None, "model": model.name, "environment": environment, "version": version,
                      "window": {"from": start.isoformat(), "to": end.isoformat()}, "roles": list(ROLES),
                      "labelled_only": labelled_only, "source_versions": versions,
                      "requested_by": actor.get_username() if getattr(actor, "is_authenticated", False) else
                      "retraining policy"})
        snapshot.manifest["snapshot"] = str(snapshot.uid)
        DatasetSnapshot.objects.filter(pk=snapshot.pk).update(manifest=snapshot.manifest)
        audit_record(AuditAction.DATASET_CREATE, actor=actor, target=snapshot_target(snapshot),
                     after={"window": snapshot.manifest["window"], "version": version, "rows_expected": expected,
                            "labelled_only": labelled_only, "source_versions": versions,
                            "sensitive_treatment": treatment})
        _enqueue_cut(snapshot)
    return snapshot


def _sensitive_names(model: Any, versions: list[int]) -> set[str]:
    names: set[str] = set()
    for cols in ModelVersion.objects.filter(model=model, number__in=versions).values_list("sensitive_columns",
                                                                                           flat=True):
        names |= set(cols or {})
    return names


# Sent once the transaction that asked for a snapshot commits (``snapshot_id``, ``request_ctx``):
# monitoring.datasets.tasks enqueues its cut.
snapshot_requested = Signal()


def _enqueue_cut(snapshot: DatasetSnapshot) -> None:
    ctx = context.current().as_task_kwargs()
    pk = snapshot.pk
    transaction.on_commit(lambda: snapshot_requested.send(sender=DatasetSnapshot, snapshot_id=pk, request_ctx=ctx))


def snapshot_read(*, snapshot: DatasetSnapshot, actor: Any, token: DatasetAccessToken | None = None,
                  via: str = "api") -> DatasetSnapshot:
    """Record one read of a snapshot's file (by a person, or by a retraining call's token); refuses one that is not
    ready."""
    if snapshot.status != SnapshotStatus.READY or snapshot.blob_id is None:
        raise ValidationError({"snapshot": f"This snapshot is {snapshot.get_status_display().lower()}, not ready: "
                                           "nothing to download yet."})
    with transaction.atomic():
        if token is not None:
            DatasetAccessToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
        audit_record(AuditAction.DATASET_DOWNLOAD, actor=actor, target=snapshot_target(snapshot),
                     actor_username=f"dataset token {token.prefix}…" if token is not None else None,
                     metadata={"sha256": snapshot.sha256, "rows": snapshot.manifest.get("rows"), "via": via,
                               **({"token": str(token.uid)} if token is not None else {})})
    return snapshot


def token_refused(*, token: DatasetAccessToken, asked_for: str) -> None:
    """A dataset token used for anything but its own snapshot: recorded, then answered as not found."""
    with transaction.atomic():
        audit_record(AuditAction.DATASET_DOWNLOAD_REFUSED, actor=None, actor_username=f"dataset token {token.prefix}…",
                     target=Target("dataset_snapshot", asked_for[:128], "another snapshot"),
                     outcome=AuditOutcome.DENIED, metadata={"token": str(token.uid),
                                                            "token_snapshot": str(token.snapshot.uid)})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def token_issue(*, snapshot: DatasetSnapshot) -> tuple[DatasetAccessToken, str]:
    """A read-only token for this one snapshot, valid ``PORTAL_DATASET_TOKEN_MINUTES``; the plaintext is returned
    once and only its hash kept."""
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(30)
    token = DatasetAccessToken.objects.create(
        snapshot=snapshot, prefix=plaintext[:10], key_hash=hash_key(plaintext),
        expires_at=timezone.now() + dt.timedelta(minutes=settings.PORTAL_DATASET_TOKEN_MINUTES))
    return token, plaintext


def token_lookup(plaintext: str) -> DatasetAccessToken | None:
    if not plaintext.startswith(TOKEN_PREFIX):
        return None
    return DatasetAccessToken.objects.select_related("snapshot__model__team").filter(
        key_hash=hash_key(plaintext)).first()


# --- Lineage (registered into registry.hooks) ------------------------------------------------------------------

UID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$")
SHA = re.compile(r"^[0-9a-f]{64}$")


def training_sets_resolve(model: Any, references: list[str], actor: Any) -> list[str]:
    """Snapshot uids for ``references`` (uids or content SHA-256), each a ready snapshot of ``model``'s team that
    ``actor`` may see; anything else is refused, naming it."""
    problems: list[str] = []
    found: list[str] = []
    visible = scope_to_teams(DatasetSnapshot.objects.select_related("model"), actor)
    for raw in references:
        ref = str(raw).strip().lower()
        if not ref:
            continue
        if UID.match(ref):
            snapshot = visible.filter(uid=ref).first()
        elif SHA.match(ref):
            snapshot = visible.filter(sha256=ref).first()
        else:
            problems.append(f"{raw!r} is neither a snapshot id nor a snapshot's SHA-256.")
            continue
        if snapshot is None:
            problems.append(f"{raw}: no snapshot of yours has this id or hash.")
        elif snapshot.model.team_id != model.team_id:
            problems.append(f"{raw}: that snapshot belongs to another team's model ({snapshot.model.name}); a version "
                            "may only name its own team's training data.")
        elif snapshot.status != SnapshotStatus.READY:
            problems.append(f"{raw}: that snapshot is {snapshot.get_status_display().lower()}, not ready.")
        elif str(snapshot.uid) not in found:
            found.append(str(snapshot.uid))
    if len(found) > 100:
        problems.append("Name at most 100 snapshots in trained_on.")
    if problems:
        raise ValidationError({"trained_on": problems})
    return found


def request_target(request: RetrainingRequest) -> Target:
    return Target("retraining_request", str(request.uid), str(request)[:255], request.model.team.slug)


def requests_done_by(*, version: Any, snapshot_uids: list[str], actor: Any) -> None:
    """A version registered as trained on a request's snapshot closes the request as done."""
    for request in RetrainingRequest.objects.select_related("model__team").filter(
            snapshot__uid__in=snapshot_uids, status__in=OPEN_RETRAINING):
        RetrainingRequest.objects.filter(pk=request.pk).update(status=RetrainingStatus.DONE, closed_at=timezone.now())
        audit_record(AuditAction.RETRAIN_CLOSE, actor=actor, target=request_target(request),
                     before={"status": request.status}, after={"status": "done", "version": version.number})


def training_sets_record(version: Any, uids: list[str], actor: Any) -> list[dict[str, Any]]:
    """Called inside the transaction that creates ``version``: one link per snapshot (with the content hash it was
    trained on) and one audit event; an open retraining request for one of them is done."""
    links = []
    for snapshot in DatasetSnapshot.objects.select_for_update().filter(uid__in=uids).select_related("model"):
        TrainingLink.objects.create(version=version, snapshot=snapshot, snapshot_sha256=snapshot.sha256)
        links.append({"snapshot": str(snapshot.uid), "sha256": snapshot.sha256, "model": snapshot.model.name,
                      "environment": snapshot.environment})
    audit_record(AuditAction.VERSION_TRAINED_ON, actor=actor,
                 target=Target("modelversion", str(version.uid), str(version), version.model.team.slug),
                 after={"trained_on": links})
    requests_done_by(version=version, snapshot_uids=uids, actor=actor)
    return links
