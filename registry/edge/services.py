"""Edge packages and device tokens: the writes, each audited in its own transaction.

A package is a row a worker builds in steps (``edge_package_build``: claim, convert and prove in the sandbox,
measure each form on the reference rows, sign, store), shown live on the model page. A device token uploads, for
its one model, the predictions that the package's runner kept on the device (``edge_upload``): each becomes a
record of serving's prediction buffer with role ``edge``, so monitoring's flusher writes it into the prediction log
keyed by the id the device made, and a resend is logged once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import re
import secrets
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.dispatch import Signal
from django.utils import timezone

from portal import context
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import AuditOutcome
from portal.permissions import require_capability
from portal.tasks import TRANSIENT_ERRORS
from registry import storage
from registry.deployments.services import DeploymentFailed
from registry.edge import package as builder
from registry.models import (
    EdgeDeviceToken,
    EdgePackage,
    EdgePackageStatus,
    Environment,
    ModelVersion,
    RegisteredModel,
    VersionStatus,
)
from registry.serving import buffer
from registry.serving.runtime import input_columns

logger = logging.getLogger(__name__)
# Sent once the transaction that asks for a package commits (``package_id``, ``request_ctx``): registry.edge.tasks
# enqueues its build.
package_requested = Signal()
TOKEN_PREFIX = "mle_"  # noqa: S105 - the public prefix of device tokens, not a secret
MAX_RECORDS = 5000  # per upload request (the runner sends 500 at a time)
MAX_AGE_DAYS = 90  # a prediction older than this is refused (kept on the device past the log's usefulness)
MAX_AHEAD_SECONDS = 300  # device clocks run ahead; past this a timestamp is refused
PREDICTION_ID = re.compile(r"^[0-9a-f]{32}$")


def package_target(package: EdgePackage) -> Target:
    return Target(type="edge_package", id=str(package.uid),
                  repr=f"{package.model.name} v{package.version.number} edge package", team_slug=package.model.team.slug)


def token_target(token: EdgeDeviceToken) -> Target:
    return Target(type="edge_device_token", id=str(token.uid), repr=f"{token.name} ({token.prefix}…) for "
                  f"{token.model.name}", team_slug=token.model.team.slug)


# --- Packages --------------------------------------------------------------------------------------------------

def edge_package_request(*, version: ModelVersion, int8: bool = True, actor: Any) -> EdgePackage:
    """Queue a package of a ready version for a worker. Makers (data scientists, admins) only, as deploying to dev."""
    require_capability(actor, "deploy_dev")
    if version.status != VersionStatus.READY or version.artifact_id is None:
        raise ValidationError({"version": f"Version {version.number} is {version.status}; only ready versions are "
                                          "packaged."})
    with transaction.atomic():
        if EdgePackage.objects.select_for_update().filter(
                version=version, status__in=[EdgePackageStatus.QUEUED, EdgePackageStatus.RUNNING]).exists():
            raise ValidationError({"version": f"A package of version {version.number} is already being built."})
        package = EdgePackage.objects.create(
            model=version.model, version=version, int8_requested=int8,
            requested_by=actor if getattr(actor, "is_authenticated", False) else None,
            request_id=context.current().request_id, log=[_entry("Package requested.")])
        audit_record(AuditAction.EDGE_PACKAGE_REQUEST, actor=actor, target=package_target(package),
                     after={"version": version.number, "int8": int8})
        ctx = context.current().as_task_kwargs()
        transaction.on_commit(lambda: package_requested.send(sender=EdgePackage, package_id=package.pk,
                                                             request_ctx=ctx))
    return package


def _entry(message: str) -> dict[str, str]:
    return {"at": timezone.now().isoformat(timespec="seconds"), "message": message}


def _step(package: EdgePackage, progress: int, message: str) -> None:
    package.progress = progress
    package.log = [*package.log, _entry(message)]
    EdgePackage.objects.filter(pk=package.pk).update(progress=progress, log=package.log)


def _claim(package_id: int) -> EdgePackage | None:
    """Take the package for this worker: queued, or running when a redelivered task finds its worker died."""
    claimable = Q(status=EdgePackageStatus.QUEUED) | Q(status=EdgePackageStatus.RUNNING)
    claimed = EdgePackage.objects.filter(claimable, pk=package_id, attempts__lt=EdgePackage.MAX_ATTEMPTS).update(
        status=EdgePackageStatus.RUNNING, attempts=F("attempts") + 1, started_at=timezone.now())
    if not claimed:
        return None
    return EdgePackage.objects.select_related("model__team", "version__artifact", "version__reference__blob").get(
        pk=package_id)


def edge_package_build(*, package_id: int) -> EdgePackage | None:
    package = _claim(package_id)
    if package is None:
        current = EdgePackage.objects.select_related("model__team", "version").filter(pk=package_id).first()
        if current and current.status == EdgePackageStatus.RUNNING and current.attempts >= EdgePackage.MAX_ATTEMPTS:
            _fail(current, f"gave up after {current.attempts} attempts: the worker building it kept dying")
        return current
    try:
        _step(package, 5, "Claimed by a worker." if package.attempts == 1 else
              f"Attempt {package.attempts}: the previous worker stopped; starting over.")
        version = package.version
        if version.status != VersionStatus.READY or version.artifact is None:
            raise builder.PackageRefused(f"version {version.number} is no longer ready")
        tmp_root = Path(settings.VAR_DIR) / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="edge-", dir=tmp_root) as tmp:
            built = builder.build(version=version, package_uid=str(package.uid), int8=package.int8_requested,
                                  work=Path(tmp), step=lambda progress, message: _step(package, progress, message))
            blob = storage.blob_put_path(built.zip_path)
        with transaction.atomic():
            updated = EdgePackage.objects.filter(pk=package.pk, status=EdgePackageStatus.RUNNING).update(
                status=EdgePackageStatus.READY, progress=100, blob=blob, forms=built.forms,
                manifest=built.manifest, int8_note=built.int8_note, finished_at=timezone.now(),
                log=[*package.log, _entry(f"Ready: {blob.size:,} bytes, SHA-256 {blob.sha256[:16]}….")])
            if updated:
                audit_record(AuditAction.EDGE_PACKAGE_READY, actor=None, target=package_target(package),
                             after={"status": "ready", "sha256": blob.sha256, "size": blob.size,
                                    "forms": [{k: f[k] for k in ("name", "size", "sha256", "metrics")}
                                              for f in built.forms],
                                    "int8": built.int8_note or "offered",
                                    "key_fingerprint": built.manifest["key_fingerprint"]})
    except (builder.PackageRefused, DeploymentFailed, storage.IntegrityError, ImproperlyConfigured, OSError,
            ValueError) as exc:
        logger.warning("Edge package %s failed: %s", package.uid, exc)
        _fail(package, str(exc))
    except TRANSIENT_ERRORS:
        raise  # the database or the broker is briefly away: the task runs again and claims the row anew
    except Exception as exc:
        logger.exception("Edge package %s failed unexpectedly", package.uid)
        _fail(package, f"an unexpected error ({type(exc).__name__}) stopped the build; the worker's log has the "
                       "details")
    return EdgePackage.objects.select_related("model__team", "version", "blob").get(pk=package.pk)


def _fail(package: EdgePackage, error: str) -> None:
    with transaction.atomic():
        updated = EdgePackage.objects.filter(pk=package.pk, status=EdgePackageStatus.RUNNING).update(
            status=EdgePackageStatus.FAILED, error=error[:4000], finished_at=timezone.now(),
            log=[*package.log, _entry(f"Failed: {error[:500]}")])
        if updated:
            audit_record(AuditAction.EDGE_PACKAGE_FAIL, actor=None, target=package_target(package),
                         outcome=AuditOutcome.FAILURE, before={"status": "running"},
                         after={"status": "failed", "error": error[:1000]})


def edge_package_download_record(*, package: EdgePackage, actor: Any) -> None:
    """Every download of a package is an audit event (who took which signed files where)."""
    if package.status != EdgePackageStatus.READY or package.blob_id is None:
        raise ValidationError({"package": f"This package is {package.get_status_display().lower()}: nothing to "
                                          "download."})
    assert package.blob is not None
    audit_record(AuditAction.EDGE_PACKAGE_DOWNLOAD, actor=actor, target=package_target(package),
                 metadata={"sha256": package.blob.sha256, "version": package.version.number})


# --- Device tokens -----------------------------------------------------------------------------------------------

def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def device_token_create(*, model: RegisteredModel, name: str, environment: str = Environment.PROD,
                        actor: Any) -> tuple[EdgeDeviceToken, str]:
    """A token a device fleet uploads with, for ``model`` only, logged under ``environment``; the plaintext is
    returned once and only its hash kept."""
    require_capability(actor, "deploy_dev")
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ValidationError({"name": "Name the fleet or device (1 to 100 characters)."})
    if environment not in Environment.values:
        raise ValidationError({"environment": "Use dev, stage or prod."})
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(30)
    with transaction.atomic():
        token = EdgeDeviceToken.objects.create(model=model, environment=environment, name=name,
                                               prefix=plaintext[:10], key_hash=hash_key(plaintext),
                                               created_by=actor if getattr(actor, "is_authenticated", False) else None)
        audit_record(AuditAction.EDGE_TOKEN_CREATE, actor=actor, target=token_target(token),
                     after={"name": name, "environment": environment, "prefix": token.prefix})
    return token, plaintext


def device_token_revoke(*, token: EdgeDeviceToken, actor: Any) -> EdgeDeviceToken:
    require_capability(actor, "deploy_dev")
    with transaction.atomic():
        updated = EdgeDeviceToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        if not updated:
            raise ValidationError({"token": "This device token is already revoked."})
        audit_record(AuditAction.EDGE_TOKEN_REVOKE, actor=actor, target=token_target(token),
                     before={"active": True}, after={"active": False})
    token.refresh_from_db()
    return token


def device_token_lookup(plaintext: str) -> EdgeDeviceToken | None:
    if not plaintext.startswith(TOKEN_PREFIX):
        return None
    return EdgeDeviceToken.objects.select_related("model__team").filter(key_hash=hash_key(plaintext)).first()


def edge_upload_refused(*, token: EdgeDeviceToken, asked_for: str) -> None:
    """A device token used for another model: recorded, then answered as not found."""
    with transaction.atomic():
        audit_record(AuditAction.EDGE_UPLOAD_REFUSED, actor=None, actor_username=f"device token {token.prefix}…",
                     target=Target("registeredmodel", asked_for[:128], "another model"),
                     outcome=AuditOutcome.DENIED, metadata={"token": str(token.uid), "token_model": token.model.name})


# --- Uploads -----------------------------------------------------------------------------------------------------

@dataclass
class UploadReceipt:
    received: int
    batches: int

    def as_dict(self) -> dict[str, Any]:
        return {"received": self.received, "batches": self.batches,
                "note": "each prediction id is logged once: records sent again are kept once"}


def _is_number(value: Any) -> bool:
    """A finite JSON number (an integer too large for a float is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _finite_number(value: Any, what: str, index: int, *, low: float, high: float) -> float:
    if not _is_number(value) or not low <= float(value) <= high:
        raise ValidationError({"records": f"record {index}: {what} must be a number between {low:g} and {high:g}."})
    return float(value)


def _checked(records: Any, model: RegisteredModel) -> list[dict[str, Any]]:
    """The records, each checked; the first bad one refuses the whole upload (nothing is half-written)."""
    if not isinstance(records, list) or not records:
        raise ValidationError({"records": "Send a non-empty list of records."})
    if len(records) > MAX_RECORDS:
        raise ValidationError({"records": f"At most {MAX_RECORDS:,} records per upload; send the rest next."})
    versions = {v.number: v for v in ModelVersion.objects.filter(
        model=model, edge_packages__status=EdgePackageStatus.READY).distinct()}
    widths = {n: len(input_columns(v)) for n, v in versions.items()}
    now = timezone.now().timestamp()
    oldest = now - MAX_AGE_DAYS * 86400
    seen: set[str] = set()
    checked = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValidationError({"records": f"record {i}: must be an object."})
        pid = record.get("id")
        if not isinstance(pid, str) or not PREDICTION_ID.match(pid):
            raise ValidationError({"records": f"record {i}: id must be 32 lowercase hex characters (uuid4().hex)."})
        version = record.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version not in versions:
            raise ValidationError({"records": f"record {i}: version {version!r} of {model.name} has no edge "
                                              "package."})
        ts = _finite_number(record.get("ts"), "ts (seconds since 1970, UTC)", i, low=oldest,
                            high=now + MAX_AHEAD_SECONDS)
        latency = _finite_number(record.get("latency_ms", 0.0), "latency_ms", i, low=0.0, high=3_600_000.0)
        inputs = record.get("inputs")
        if not isinstance(inputs, list) or (widths[version] and len(inputs) != widths[version]) or not all(
                v is None or _is_number(v) for v in inputs):
            raise ValidationError({"records": f"record {i}: inputs must be a list of {widths[version]} numbers "
                                              "(null where missing)."})
        output = record.get("output")
        if not (output is None or isinstance(output, str | bool) or _is_number(output)) or (
                isinstance(output, str) and len(output) > 1000):
            raise ValidationError({"records": f"record {i}: output must be a number, text or null."})
        if pid in seen:
            continue  # the same prediction twice in one upload: once is enough
        seen.add(pid)
        checked.append({"id": pid, "version": version, "ts": ts, "latency_ms": latency, "inputs": inputs,
                        "output": output})
    return checked


def edge_upload(*, token: EdgeDeviceToken, records: Any) -> UploadReceipt:
    """Put a device's kept predictions into the prediction buffer (grouped per version, time and latency, as serving
    writes one record per request), then note when the fleet last reported. Raises ``ValidationError`` before
    anything is written when a record is bad, ``buffer.BufferUnavailable`` when neither Redis nor the outbox
    takes them (the device keeps them and tries again)."""
    model = token.model
    checked = _checked(records, model)
    groups: dict[tuple[int, float, float], list[dict[str, Any]]] = defaultdict(list)
    for record in checked:
        groups[(record["version"], record["ts"], record["latency_ms"])].append(record)
    request_id = context.current().request_id
    for (version, ts, latency), rows in groups.items():
        buffer.emit({"model": model.name, "environment": token.environment, "version": version, "role": "edge",
                     "ts": ts, "latency_ms": round(latency * len(rows), 4), "request_id": request_id, "error": "",
                     "ids": [r["id"] for r in rows], "inputs": [r["inputs"] for r in rows],
                     "outputs": [r["output"] for r in rows], "subjects": None, "unit": ""})
    EdgeDeviceToken.objects.filter(pk=token.pk).update(last_report_at=timezone.now(),
                                                       records_received=F("records_received") + len(checked))
    return UploadReceipt(received=len(checked), batches=len(groups))


def last_reports(model: RegisteredModel) -> dt.datetime | None:
    """When any of the model's device fleets last uploaded."""
    return (EdgeDeviceToken.objects.filter(model=model, last_report_at__isnull=False)
            .order_by("-last_report_at").values_list("last_report_at", flat=True).first())
