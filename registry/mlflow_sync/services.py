"""MLflow <-> portal: a team's MLflow registry feeds the portal, and what the portal puts live shows up in MLflow.

In: ``mlflow_connect`` registers a webhook on the tracking server through MLflow's own client (events
``model_version.created`` and ``model_version_alias.created``, signed with a secret made here and stored encrypted).
``webhook_receive`` checks MLflow 3's signature (``X-MLflow-Signature: v1,<base64 HMAC-SHA256 of
"<delivery id>.<timestamp>.<body>">``, timestamp within ``MAX_SKEW_SECONDS``); a refused delivery is a 401 and an
audit event. An accepted one becomes an ``MlflowSyncJob`` row (one per MLflow version: a repeated delivery finds it)
committed before the worker is asked, so nothing is lost when the worker or broker is away; the worker imports the
version through the manual import (``registry.versions.mlflow_import``: the same scan, sandbox, lineage and
duplicate detection) and retries with backoff. ``mlflow_reconcile`` (beat) lists the versions made on the server
since the connection was made and queues any the webhooks missed, and re-queues jobs whose retry is overdue.

Out: when a version goes live as an environment's champion (a promotion, a dev deployment or a rollback), the
deployments' ``deployment_finished`` event queues an alias job in the same transaction; after commit a worker sets
the alias ``dev``/``stage``/``prod`` and the tags ``portal.<env>.approved_by``, ``.approved_at`` and
``.audit_event`` on the MLflow version, and audits it. No network I/O happens inside ``transaction.atomic()``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, MultiFernet
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.dispatch import Signal, receiver
from django.utils import timezone

from portal import context
from portal.environments import ENVIRONMENTS
from portal.audit.actions import AuditAction
from portal.audit.record import AuditOutcome, Target, audit_record
from portal.models import AuditEvent, Team
from portal.permissions import require_capability
from registry.deployments.services import deployment_finished
from registry.models import (
    Deployment,
    MlflowConnection,
    MlflowSource,
    MlflowSyncJob,
    MlflowSyncKind,
    MlflowSyncStatus,
    PromotionRequest,
    RegisteredModel,
    Strategy,
)
from registry.scanning.findings import UploadRejected
from registry.versions import services as versions
from registry.versions.mlflow_import import (
    _bound_mlflow_requests,
    _client,
    _probe,
    mlflow_import,
    public_tracking_uri,
)

logger = logging.getLogger(__name__)
# Sent once the transaction that makes a sync job due commits (``job_id``, ``request_ctx``, ``countdown`` seconds):
# registry.mlflow_sync.tasks enqueues its run.
job_due = Signal()

WEBHOOK_PATH = "/api/v1/integrations/mlflow/webhook"
EVENTS = ("model_version.created", "model_version_alias.created")
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
MAX_SKEW_SECONDS = 300
MAX_BODY_BYTES = 256 * 1024
MAX_ATTEMPTS = 8
RUNNING_STALE = timedelta(minutes=15)
ENVIRONMENT_ALIASES = ENVIRONMENTS
RECONCILE_PAGES = 5


class WebhookRefused(Exception):
    """A delivery whose signature, timestamp or connection does not check out (recorded before this is raised)."""


# --- The secret, encrypted at rest -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(k.encode()) for k in keys])


def secret_encrypt(secret: str) -> str:
    return _fernet(tuple(settings.PORTAL_PAYLOAD_KEYS)).encrypt(secret.encode()).decode()


def connection_secret(connection: MlflowConnection) -> str:
    return _fernet(tuple(settings.PORTAL_PAYLOAD_KEYS)).decrypt(connection.secret_encrypted.encode()).decode()


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow 3's webhook signature (mlflow/webhooks/delivery.py ``_generate_hmac_signature``)."""
    digest = hmac.new(secret.encode(), delivery_id.encode() + b"." + timestamp.encode() + b"." + body,
                      hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def connection_target(connection: MlflowConnection) -> Target:
    return Target(type="mlflow_connection", id=str(connection.uid), repr=f"{connection.team.slug}: "
                  f"{connection.tracking_uri}"[:255], team_slug=connection.team.slug)


# --- Connecting ----------------------------------------------------------------------------------------------------

def _checked_tracking_uri(uri: str) -> str:
    uri = (uri or "").strip().rstrip("/")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError({"tracking_uri": "Give the tracking server's http(s) address, such as "
                                               "http://mlflow.internal:5000."})
    if parts.username or parts.password or parts.query:
        raise ValidationError({"tracking_uri": "Put no credentials in the address; the workers pass MLflow's own "
                                               "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN."})
    return uri


def mlflow_connect(*, team: Team, tracking_uri: str, actor: Any, write_back: bool = True,
                   portal_url: str = "") -> MlflowConnection:
    """Register the portal's webhook on the tracking server (MLflow's own client) and keep the connection. The
    server is asked first, outside any transaction; a row that then cannot be saved takes its webhook back."""
    require_capability(actor, "manage_teams")
    uri = _checked_tracking_uri(tracking_uri)
    base = (portal_url or settings.PORTAL_BASE_URL).strip().rstrip("/")
    if urlsplit(base).scheme not in ("http", "https") or not urlsplit(base).hostname:
        raise ValidationError({"portal_url": "Give the portal's address as the tracking server reaches it."})
    if MlflowConnection.objects.filter(team=team, tracking_uri=uri).exists():
        raise ValidationError({"tracking_uri": f"Team {team.slug} is already connected to {uri}."})
    uid = uuid.uuid4()
    secret = secrets.token_urlsafe(32)
    url = f"{base}{WEBHOOK_PATH}?connection={uid}"
    _bound_mlflow_requests()
    _probe(uri)
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        hook = client.create_webhook(name=f"mlops-portal-{team.slug}", url=url, events=list(EVENTS), secret=secret,
                                     description=f"MLOps portal, team {team.slug}: imports new versions")
    except MlflowException as exc:
        raise ValidationError({"tracking_uri": f"MLflow at {uri} refused the portal's webhook: "
                                               f"{exc.message[:300]}"}) from None
    try:
        with transaction.atomic():
            connection = MlflowConnection.objects.create(
                uid=uid, team=team, tracking_uri=uri, secret_encrypted=secret_encrypt(secret),
                webhook_id=str(hook.webhook_id), webhook_url=url, write_back=write_back, created_by=actor)
            audit_record(AuditAction.MLFLOW_CONNECT, actor=actor, target=connection_target(connection),
                         after={"tracking_uri": uri, "webhook_id": connection.webhook_id, "webhook_url": url,
                                "events": list(EVENTS), "write_back": write_back})
    except Exception:
        try:
            client.delete_webhook(hook.webhook_id)
        except Exception:  # the row's failure is what the caller needs to hear about
            logger.warning("Could not remove webhook %s from %s", hook.webhook_id, uri)
        raise
    return connection


def mlflow_disconnect(*, connection: MlflowConnection, actor: Any) -> MlflowConnection:
    """Stop a connection: its webhook deliveries are refused from now on, the reconcile and write-back skip it, and
    its webhook is taken off the tracking server (tried once, outside any transaction; a server that cannot be
    reached keeps a webhook whose deliveries the portal refuses, and the audit event says so). Kept, not deleted:
    its jobs and audit trail stay readable."""
    require_capability(actor, "manage_teams")
    if not connection.active:
        raise ValidationError({"connection": f"The connection to {connection.tracking_uri} is already disabled."})
    removed, problem = False, ""
    if connection.webhook_id:
        try:
            _bound_mlflow_requests()
            _probe(connection.tracking_uri)
            _client(connection.tracking_uri).delete_webhook(connection.webhook_id)
            removed = True
        except Exception as exc:  # the server away or the webhook gone: the portal refuses its deliveries anyway
            problem = _message(exc)[:300]
    with transaction.atomic():
        updated = MlflowConnection.objects.filter(pk=connection.pk, active=True).update(active=False)
        if not updated:
            raise ValidationError({"connection": f"The connection to {connection.tracking_uri} is already disabled."})
        audit_record(AuditAction.MLFLOW_DISCONNECT, actor=actor, target=connection_target(connection),
                     before={"active": True}, after={"active": False, "webhook_removed": removed,
                                                     "webhook_problem": problem})
    connection.refresh_from_db()
    return connection


RETRYABLE = (MlflowSyncStatus.FAILED, MlflowSyncStatus.RETRYING)


def sync_job_retry(*, job: MlflowSyncJob, actor: Any) -> MlflowSyncJob:
    """Try a failed job again now (one that gave up, or one waiting out its backoff), with a fresh count of
    attempts. A job refused by the scan is not retried: the same file would be refused again."""
    require_capability(actor, "manage_teams")
    with transaction.atomic():
        locked = MlflowSyncJob.objects.select_for_update().select_related("connection__team").get(pk=job.pk)
        if not locked.connection.active:
            raise ValidationError({"job": "Its connection is disabled; connect the server again to sync it."})
        if locked.status not in RETRYABLE:
            raise ValidationError({"job": f"A job that is {locked.get_status_display().lower()} is not retried."})
        before = {"status": locked.status, "attempts": locked.attempts, "error": locked.error[:300]}
        now = timezone.now()
        MlflowSyncJob.objects.filter(pk=locked.pk).update(status=MlflowSyncStatus.PENDING, attempts=0,
                                                          next_attempt_at=now, updated_at=now)
        audit_record(AuditAction.MLFLOW_JOB_RETRY, actor=actor, target=connection_target(locked.connection),
                     before=before, after={"status": MlflowSyncStatus.PENDING, "job": str(locked.uid),
                                           "registered_model": locked.registered_model,
                                           "mlflow_version": locked.mlflow_version})
        _enqueue_on_commit(locked)
    return MlflowSyncJob.objects.get(pk=job.pk)


# --- Webhooks in ------------------------------------------------------------------------------------------------

def _refuse(connection: MlflowConnection | None, connection_id: str, reason: str, *, delivery_id: str,
            ip: str | None) -> WebhookRefused:
    target = connection_target(connection) if connection else Target(type="mlflow_connection",
                                                                     id=connection_id[:128])
    with transaction.atomic():
        audit_record(AuditAction.MLFLOW_WEBHOOK_REFUSE, actor=None, target=target, outcome=AuditOutcome.FAILURE,
                     metadata={"reason": reason, "delivery_id": delivery_id[:64], "ip": ip or ""})
    return WebhookRefused(reason)


def webhook_receive(*, connection_id: str, headers: Any, body: bytes, ip: str | None) -> dict[str, Any]:
    """Check one delivery and queue what it announces. Raises :class:`WebhookRefused` (audited) unless the
    signature is the connection's and fresh."""
    delivery_id = str(headers.get(DELIVERY_HEADER, ""))[:64]
    stamp = str(headers.get(TIMESTAMP_HEADER, ""))
    given = str(headers.get(SIGNATURE_HEADER, ""))
    try:
        connection = MlflowConnection.objects.select_related("team").filter(
            uid=uuid.UUID(connection_id), active=True).first()
    except (ValueError, TypeError):
        connection = None
    if connection is None:
        raise _refuse(None, str(connection_id or ""), "unknown connection", delivery_id=delivery_id, ip=ip)
    if len(body) > MAX_BODY_BYTES:
        raise _refuse(connection, "", "body too large", delivery_id=delivery_id, ip=ip)
    expected = signature(connection_secret(connection), delivery_id, stamp, body)
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise _refuse(connection, "", "bad signature" if given else "no signature", delivery_id=delivery_id, ip=ip)
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > MAX_SKEW_SECONDS:
        raise _refuse(connection, "", "stale or missing timestamp (replay?)", delivery_id=delivery_id, ip=ip)
    try:
        payload = json.loads(body)
        event = f"{payload['entity']}.{payload['action']}"
        data = payload.get("data") or {}
        name, version = str(data.get("name", "")), str(data.get("version", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValidationError({"body": "Not an MLflow webhook payload."}) from None
    if event not in EVENTS:
        return {"event": event, "ignored": True}
    if not name or not version.isdigit() or len(name) > 256:
        raise ValidationError({"data": "An MLflow model version event names its model and version number."})
    with transaction.atomic():
        job, created = _import_job(connection, name, version, origin="webhook")
        audit_record(AuditAction.MLFLOW_WEBHOOK_RECEIVE, actor=None, target=connection_target(connection),
                     metadata={"event": event, "delivery_id": delivery_id, "registered_model": name,
                               "mlflow_version": version, "alias": str(data.get("alias", ""))[:255],
                               "job": str(job.uid), "duplicate": not created})
    return {"event": event, "job": str(job.uid), "status": job.status, "duplicate": not created}


def _import_job(connection: MlflowConnection, name: str, version: str, *, origin: str) -> tuple[MlflowSyncJob, bool]:
    """The one import job of that MLflow version (made, and queued on commit, when new)."""
    try:
        with transaction.atomic():
            job = MlflowSyncJob.objects.create(connection=connection, kind=MlflowSyncKind.IMPORT,
                                               registered_model=name, mlflow_version=version, origin=origin)
    except IntegrityError:
        return MlflowSyncJob.objects.get(connection=connection, kind=MlflowSyncKind.IMPORT, registered_model=name,
                                         mlflow_version=version), False
    _enqueue_on_commit(job)
    return job, True


def _enqueue_on_commit(job: MlflowSyncJob, countdown: float = 0) -> None:
    ctx = context.current().as_task_kwargs()
    transaction.on_commit(lambda: job_due.send(sender=MlflowSyncJob, job_id=job.pk, request_ctx=ctx,
                                               countdown=countdown))


# --- Running a job (a worker) ------------------------------------------------------------------------------------

def backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(30 * 2 ** max(attempts - 1, 0), 3600))


def sync_job_run(*, job_id: int) -> MlflowSyncJob:
    """Claim and run one job. Idempotent: a job that is not due (done, running elsewhere) is left as it is."""
    now = timezone.now()
    claimed = MlflowSyncJob.objects.filter(
        pk=job_id, status__in=[MlflowSyncStatus.PENDING, MlflowSyncStatus.RETRYING]).update(
        status=MlflowSyncStatus.RUNNING, attempts=F("attempts") + 1, updated_at=now)
    job = MlflowSyncJob.objects.select_related("connection__team", "connection__created_by", "version__model",
                                               "deployment").get(pk=job_id)
    if not claimed:
        return job
    try:
        if job.kind == MlflowSyncKind.IMPORT:
            _run_import(job)
        else:
            _run_alias(job)
    except UploadRejected as exc:
        _finish_failed(job, MlflowSyncStatus.REFUSED, "The scan refused it: " + "; ".join(
            f.message for f in exc.findings[:3]))
    except PermissionDenied as exc:
        _finish_failed(job, MlflowSyncStatus.FAILED, str(exc))
    except Exception as exc:  # the tracking server away, a version not there yet, a name the portal refuses...
        message = _message(exc)
        if job.attempts >= MAX_ATTEMPTS:
            _finish_failed(job, MlflowSyncStatus.FAILED, f"gave up after {job.attempts} attempts: {message}")
        else:
            delay = backoff(job.attempts)
            with transaction.atomic():
                MlflowSyncJob.objects.filter(pk=job.pk).update(
                    status=MlflowSyncStatus.RETRYING, error=message[:4000], updated_at=timezone.now(),
                    next_attempt_at=timezone.now() + delay)
                _enqueue_on_commit(job, countdown=delay.total_seconds())
    return MlflowSyncJob.objects.get(pk=job.pk)


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(str(m) for m in exc.messages)
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__


def _finish_failed(job: MlflowSyncJob, status: str, error: str) -> None:
    with transaction.atomic():
        MlflowSyncJob.objects.filter(pk=job.pk).update(status=status, error=error[:4000], updated_at=timezone.now())
        action = AuditAction.MLFLOW_IMPORT_FAIL if job.kind == MlflowSyncKind.IMPORT else AuditAction.MLFLOW_ALIAS_FAIL
        audit_record(action, actor=None, target=connection_target(job.connection), outcome=AuditOutcome.FAILURE,
                     metadata={"job": str(job.uid), "registered_model": job.registered_model,
                               "mlflow_version": job.mlflow_version, "environment": job.environment,
                               "status": status, "error": error[:1000], "attempts": job.attempts})


def _run_import(job: MlflowSyncJob) -> None:
    connection = job.connection
    actor = connection.created_by
    if actor is None or not actor.is_active:
        raise PermissionDenied("The person who connected this MLflow server can no longer act for it; connect it "
                               "again.")
    name = job.registered_model
    model = RegisteredModel.objects.select_related("team").filter(name=name).first()
    if model is not None and model.team_id != connection.team_id:
        raise PermissionDenied(f"The portal's model {name!r} belongs to another team; nothing was imported.")
    if model is None:
        try:
            model = versions.model_register(name=name, team=connection.team, actor=actor,
                                            description=f"Registered from MLflow at {connection.tracking_uri}.")
        except ValidationError:
            model = RegisteredModel.objects.filter(name=name, team=connection.team).first()
            if model is None:  # a name the portal does not take (its names are lowercase, digits and hyphens)
                raise
    result = mlflow_import(model=model, uri=f"models:/{name}/{job.mlflow_version}", actor=actor,
                           tracking_uri=connection.tracking_uri,
                           description=f"Imported from MLflow ({name} version {job.mlflow_version}) as it was "
                                       "registered")
    with transaction.atomic():
        MlflowSyncJob.objects.filter(pk=job.pk).update(
            status=MlflowSyncStatus.DONE if result.created else MlflowSyncStatus.DUPLICATE, model=model,
            version=result.version, error="", updated_at=timezone.now())
        audit_record(AuditAction.MLFLOW_IMPORT, actor=actor, target=versions.version_target(result.version),
                     metadata={"job": str(job.uid), "origin": job.origin, "registered_model": name,
                               "mlflow_version": job.mlflow_version, "tracking_uri": connection.tracking_uri,
                               "duplicate_of_existing": not result.created})


def _approval(deployment: Deployment | None) -> tuple[str, str, str]:
    """Who approved what went live (the promotion's approvers, else who asked for the deployment), when, and the
    id of the audit event that made it live."""
    if deployment is None:
        return "", "", ""
    promotion = PromotionRequest.objects.filter(deployment=deployment).first()
    names: list[str] = []
    if promotion is not None:
        names = [a.approver.get_username() for a in promotion.approvals.select_related("approver")
                 if a.approver is not None and a.decision == "approve"]
    if not names and deployment.requested_by is not None:
        names = [deployment.requested_by.get_username()]
    event = AuditEvent.objects.filter(action=AuditAction.DEPLOYMENT_LIVE.label,
                                      target_id=str(deployment.uid)).order_by("-seq").first()
    when = (deployment.finished_at or timezone.now()).isoformat()
    return ",".join(names), when, str(event.pk) if event else ""


def _run_alias(job: MlflowSyncJob) -> None:
    connection = job.connection
    approved_by, approved_at, event_id = _approval(job.deployment)
    env = job.environment
    tags = {f"portal.{env}.approved_by": approved_by or "-", f"portal.{env}.approved_at": approved_at or "-",
            f"portal.{env}.audit_event": event_id or "-"}
    if job.version is not None:
        tags[f"portal.{env}.portal_version"] = f"{job.version.model.name} v{job.version.number}"
    _bound_mlflow_requests()
    _probe(connection.tracking_uri)
    client = _client(connection.tracking_uri)
    client.set_registered_model_alias(job.registered_model, env, job.mlflow_version)
    for key, value in tags.items():
        client.set_model_version_tag(job.registered_model, job.mlflow_version, key, value)
    with transaction.atomic():
        MlflowSyncJob.objects.filter(pk=job.pk).update(status=MlflowSyncStatus.DONE, error="",
                                                       updated_at=timezone.now())
        target = versions.version_target(job.version) if job.version else connection_target(connection)
        audit_record(AuditAction.MLFLOW_ALIAS_SET, actor=None, target=target,
                     metadata={"job": str(job.uid), "tracking_uri": connection.tracking_uri, "alias": env,
                               "registered_model": job.registered_model, "mlflow_version": job.mlflow_version,
                               "tags": tags})


# --- Portal -> MLflow: the deployments' event ----------------------------------------------------------------------

@receiver(deployment_finished, dispatch_uid="mlflow_sync.deployment_finished")
def mlflow_alias_on_live(sender: Any, *, deployment: Deployment, live: bool, **kwargs: Any) -> None:
    """A version that became an environment's champion gets that environment's alias in MLflow, for each of the
    team's connections with write-back whose server it was imported from. Runs inside the deployment's
    transaction: the job commits with it, and the worker is asked only after the commit."""
    if not live or deployment.strategy != Strategy.REPLACE or deployment.environment not in ENVIRONMENT_ALIASES:
        return
    source = MlflowSource.objects.filter(version_id=deployment.version_id).first()
    if source is None or not source.registered_model or not source.registered_version:
        return
    for connection in MlflowConnection.objects.filter(team_id=deployment.model.team_id, active=True,
                                                      write_back=True):
        if public_tracking_uri(connection.tracking_uri) != source.tracking_uri:
            continue
        job = MlflowSyncJob.objects.create(connection=connection, kind=MlflowSyncKind.ALIAS,
                                           registered_model=source.registered_model,
                                           mlflow_version=source.registered_version,
                                           environment=deployment.environment, deployment=deployment,
                                           model=deployment.model, version=deployment.version, origin="deployment")
        _enqueue_on_commit(job)


# --- The periodic reconcile (beat) --------------------------------------------------------------------------------

def mlflow_reconcile() -> dict[str, int]:
    """Queue imports for versions made on each connected server since it was connected that no webhook announced,
    and hand out again jobs whose retry is overdue (a lost message) or whose worker died mid-run. Each connection
    where versions were found is audited (``mlflow.reconcile``, the versions named), and each job handed out again
    (``mlflow.job_retry`` by no one, with the reason), in the transaction that makes the change."""
    now = timezone.now()
    found = 0
    for connection in MlflowConnection.objects.filter(active=True).select_related("team"):
        try:
            versions_seen = _server_versions(connection)
        except Exception as exc:  # one server away must not stop the others; its jobs wait for the next round
            logger.warning("MLflow reconcile of %s failed: %s", connection.tracking_uri, _message(exc)[:300])
            continue
        with transaction.atomic():
            new_versions = []
            for name, version in versions_seen:
                _job, created = _import_job(connection, name, version, origin="reconcile")
                if created:
                    new_versions.append(f"{name}/{version}")
            MlflowConnection.objects.filter(pk=connection.pk).update(reconciled_at=now)
            if new_versions:
                audit_record(AuditAction.MLFLOW_RECONCILE, actor=None, target=connection_target(connection),
                             after={"queued": new_versions}, metadata={"seen": len(versions_seen)})
            found += len(new_versions)
    overdue = MlflowSyncJob.objects.filter(
        Q(status__in=[MlflowSyncStatus.PENDING, MlflowSyncStatus.RETRYING], next_attempt_at__lte=now - timedelta(
            seconds=60)) | Q(status=MlflowSyncStatus.RUNNING, updated_at__lte=now - RUNNING_STALE))
    requeued = 0
    for job in overdue.select_related("connection"):
        with transaction.atomic():
            status = job.status
            if job.status == MlflowSyncStatus.RUNNING:
                MlflowSyncJob.objects.filter(pk=job.pk, status=MlflowSyncStatus.RUNNING).update(
                    status=MlflowSyncStatus.RETRYING, updated_at=now)
                status = MlflowSyncStatus.RETRYING
            MlflowSyncJob.objects.filter(pk=job.pk).update(next_attempt_at=now)
            audit_record(AuditAction.MLFLOW_JOB_RETRY, actor=None, target=connection_target(job.connection),
                         before={"status": job.status},
                         after={"status": status, "job": str(job.uid), "registered_model": job.registered_model,
                                "mlflow_version": job.mlflow_version},
                         metadata={"reason": "its worker stopped mid-run" if job.status == MlflowSyncStatus.RUNNING
                                   else "its retry was not picked up in time"})
            _enqueue_on_commit(job)
        requeued += 1
    return {"found": found, "requeued": requeued}


def _server_versions(connection: MlflowConnection) -> list[tuple[str, str]]:
    """(name, version) of every model version the server made since the connection, newest first."""
    _bound_mlflow_requests()
    _probe(connection.tracking_uri)
    client = _client(connection.tracking_uri)
    since_ms = int((connection.created_at - timedelta(minutes=1)).timestamp() * 1000)
    seen: list[tuple[str, str]] = []
    token = None
    for _page in range(RECONCILE_PAGES):
        page = client.search_model_versions(max_results=200, order_by=["creation_timestamp DESC"],
                                            page_token=token)
        for mv in page:
            if int(mv.creation_timestamp or 0) < since_ms:
                return seen
            seen.append((str(mv.name), str(mv.version)))
        token = getattr(page, "token", None)
        if not token:
            break
    return seen
