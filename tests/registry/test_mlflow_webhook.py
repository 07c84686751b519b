"""The MLflow webhook receiver and sync jobs without a tracking server: every kind of bad delivery is a 401 and an
audit event, a good one queues exactly one job per MLflow version, and a job that cannot reach its server is
retried with backoff, shown on the model's page, and given up (audited) only after MAX_ATTEMPTS."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from portal.models import AuditEvent, Team
from registry.mlflow_sync import services as mlflow_sync
from registry.models import MlflowConnection, MlflowSyncJob
from registry.versions import services
from tests.conftest import free_port

pytestmark = pytest.mark.django_db
SECRET = "s3cret-for-tests-only-0123456789"


@pytest.fixture
def connection(personas: dict[str, Any]) -> MlflowConnection:
    return MlflowConnection.objects.create(team=Team.objects.get(slug="acme"),
                                           tracking_uri=f"http://127.0.0.1:{free_port()}",
                                           secret_encrypted=mlflow_sync.secret_encrypt(SECRET),
                                           webhook_id="wh-1", created_by=personas["admin"])


def deliver(client: Client, connection_id: Any, payload: dict[str, Any], *, secret: str = SECRET,
            stamp: int | None = None, signed: bool = True) -> Any:
    body = json.dumps(payload).encode()
    delivery, ts = str(uuid.uuid4()), str(int(time.time()) if stamp is None else stamp)
    headers = {"HTTP_X_MLFLOW_DELIVERY_ID": delivery, "HTTP_X_MLFLOW_TIMESTAMP": ts}
    if signed:
        headers["HTTP_X_MLFLOW_SIGNATURE"] = mlflow_sync.signature(secret, delivery, ts, body)
    return client.post(f"{mlflow_sync.WEBHOOK_PATH}?connection={connection_id}", body,
                       content_type="application/json", **headers)


def created(version: str = "1", name: str = "churn") -> dict[str, Any]:
    return {"entity": "model_version", "action": "created", "timestamp": "2026-12-07T00:00:00+00:00",
            "data": {"name": name, "version": version, "source": "models:/m-1", "run_id": None, "tags": {},
                     "description": None}}


def test_bad_deliveries_are_refused_and_audited(connection: MlflowConnection) -> None:
    client = Client()
    cases = {"bad signature": deliver(client, connection.uid, created(), secret="guessed-secret-0000000000"),
             "no signature": deliver(client, connection.uid, created(), signed=False),
             "stale or missing timestamp (replay?)": deliver(client, connection.uid, created(),
                                                             stamp=int(time.time()) - 3600),
             "unknown connection": deliver(client, uuid.uuid4(), created())}
    for reason, response in cases.items():
        assert response.status_code == 401 and response.json()["error"]["code"] == "bad_signature", reason
    refused = AuditEvent.objects.filter(action="mlflow.webhook_refuse")
    assert sorted(e.metadata["reason"] for e in refused) == sorted(cases)
    assert all(e.outcome == "failure" for e in refused)
    assert not MlflowSyncJob.objects.exists()


def test_a_signed_delivery_queues_one_job_per_mlflow_version(connection: MlflowConnection) -> None:
    client = Client()
    first = deliver(client, connection.uid, created("3"))
    assert first.status_code == 202 and first.json()["duplicate"] is False, first.content
    alias = {"entity": "model_version_alias", "action": "created", "timestamp": "x",
             "data": {"name": "churn", "alias": "champion", "version": "3"}}
    again = deliver(client, connection.uid, alias)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    ignored = deliver(client, connection.uid, {"entity": "prompt", "action": "created", "data": {}})
    assert ignored.status_code == 200 and ignored.json()["ignored"] is True
    assert deliver(client, connection.uid, {"entity": "model_version"}).status_code == 400
    job = MlflowSyncJob.objects.get()
    assert (job.kind, job.registered_model, job.mlflow_version, job.status) == ("import", "churn", "3", "pending")
    assert AuditEvent.objects.filter(action="mlflow.webhook_receive").count() == 2


def test_an_unreachable_server_is_retried_with_backoff_shown_and_finally_given_up(
        connection: MlflowConnection, personas: dict[str, Any], client: Client) -> None:
    services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    job, _ = mlflow_sync._import_job(connection, "churn", "7", origin="webhook")
    started = timezone.now()
    job = mlflow_sync.sync_job_run(job_id=job.pk)
    assert job.status == "retrying" and job.attempts == 1 and "did not answer" in job.error
    assert started + timedelta(seconds=25) < job.next_attempt_at < started + timedelta(seconds=60)
    client.force_login(personas["viewer"])
    page = client.get("/models/churn/").content.decode()
    assert 'data-testid="mlflow-sync"' in page and "churn/7" in page and "did not answer" in page
    assert mlflow_sync.backoff(2) == timedelta(seconds=60) and mlflow_sync.backoff(20) == timedelta(hours=1)
    MlflowSyncJob.objects.filter(pk=job.pk).update(attempts=mlflow_sync.MAX_ATTEMPTS - 1)
    job = mlflow_sync.sync_job_run(job_id=job.pk)
    assert job.status == "failed" and job.error.startswith(f"gave up after {mlflow_sync.MAX_ATTEMPTS} attempts")
    assert AuditEvent.objects.get(action="mlflow.import_fail").metadata["mlflow_version"] == "7"
    assert mlflow_sync.sync_job_run(job_id=job.pk).attempts == mlflow_sync.MAX_ATTEMPTS  # not due: left alone


def test_a_name_held_by_another_team_is_refused_without_retrying(connection: MlflowConnection,
                                                                 personas: dict[str, Any]) -> None:
    services.model_register(name="churn", team=Team.objects.get(slug="other"), actor=personas["admin"])
    job, _ = mlflow_sync._import_job(connection, "churn", "1", origin="reconcile")
    job = mlflow_sync.sync_job_run(job_id=job.pk)
    assert job.status == "failed" and "belongs to another team" in job.error and job.attempts == 1


def test_connecting_refuses_credentials_in_the_address(personas: dict[str, Any], api_as: Any) -> None:
    response = api_as(personas["admin"]).post("/api/v1/integrations/mlflow/connections",
                                              {"tracking_uri": "http://user:pw@127.0.0.1:5000", "team": "acme"},
                                              format="json")
    assert response.status_code == 400 and "no credentials" in response.content.decode()
    assert not MlflowConnection.objects.exists()


def test_the_reconcile_audits_each_job_it_hands_out_again(connection: MlflowConnection,
                                                          django_capture_on_commit_callbacks: Any) -> None:
    """A job whose worker died mid-run (RUNNING for longer than RUNNING_STALE) and one whose retry message was lost
    are handed out again by the reconcile, each with an audit event by no one that says why; a job not yet due is
    left alone and unaudited. The tracking server is unreachable, so nothing new is found (and nothing is audited
    for it)."""
    now = timezone.now()
    stale, _ = mlflow_sync._import_job(connection, "churn", "1", origin="webhook")
    lost, _ = mlflow_sync._import_job(connection, "churn", "2", origin="webhook")
    due_later, _ = mlflow_sync._import_job(connection, "churn", "3", origin="webhook")
    MlflowSyncJob.objects.filter(pk=stale.pk).update(status="running",
                                                     updated_at=now - mlflow_sync.RUNNING_STALE - timedelta(minutes=1))
    MlflowSyncJob.objects.filter(pk=lost.pk).update(status="retrying", next_attempt_at=now - timedelta(minutes=5))
    MlflowSyncJob.objects.filter(pk=due_later.pk).update(status="retrying", next_attempt_at=now + timedelta(hours=1))
    with django_capture_on_commit_callbacks(execute=False) as queued:
        outcome = mlflow_sync.mlflow_reconcile()
    assert outcome == {"found": 0, "requeued": 2} and len(queued) == 2
    events = {e.after["mlflow_version"]: e for e in AuditEvent.objects.filter(action="mlflow.job_retry")}
    assert set(events) == {"1", "2"}
    assert events["1"].actor is None and events["1"].before == {"status": "running"}
    assert events["1"].after["status"] == "retrying" and "worker stopped" in events["1"].metadata["reason"]
    assert events["2"].before == {"status": "retrying"} and "not picked up" in events["2"].metadata["reason"]
    assert MlflowSyncJob.objects.get(pk=stale.pk).status == "retrying"
    assert not AuditEvent.objects.filter(action="mlflow.reconcile").exists()
