"""The MLflow connections page (issue 34): each team's tracking servers with their webhook's state (deliveries
accepted and refused, from the audit trail), the last reconcile, and the sync jobs that failed, with a retry; creating
and disabling a connection. Everyone in the team sees it; only those who manage teams act, and the server checks it
(a 403 for a role, a 404 for another team's connection), each action audited. Without a tracking server: the one it
names is a free port nothing answers on (the browser journey connects a real one)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from portal.models import AuditEvent, Team
from registry.mlflow_sync import services as mlflow_sync
from registry.models import MlflowConnection, MlflowSyncJob, MlflowSyncStatus
from tests.conftest import free_port
from tests.registry.test_mlflow_webhook import SECRET, created, deliver

pytestmark = pytest.mark.django_db
PAGE = "/integrations/mlflow/"


@pytest.fixture
def connection(personas: dict[str, Any]) -> MlflowConnection:
    return MlflowConnection.objects.create(team=Team.objects.get(slug="acme"),
                                           tracking_uri=f"http://127.0.0.1:{free_port()}",
                                           secret_encrypted=mlflow_sync.secret_encrypt(SECRET),
                                           webhook_id="wh-1", created_by=personas["admin"])


@pytest.fixture
def jobs(connection: MlflowConnection) -> dict[str, MlflowSyncJob]:
    """One job in each state a person may need to act on, and one done."""
    def job(version: str, status: str, error: str = "", attempts: int = 0) -> MlflowSyncJob:
        return MlflowSyncJob.objects.create(connection=connection, kind="import", registered_model="churn",
                                            mlflow_version=version, status=status, error=error, attempts=attempts)

    return {"failed": job("1", MlflowSyncStatus.FAILED, "gave up after 8 attempts: did not answer", 8),
            "retrying": job("2", MlflowSyncStatus.RETRYING, "did not answer", 2),
            "refused": job("3", MlflowSyncStatus.REFUSED, "The scan refused it: pickle opcode GLOBAL os.system", 1),
            "done": job("4", MlflowSyncStatus.DONE, "", 1)}


def _as(user: Any) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def test_the_page_shows_each_connection_with_its_webhook_reconcile_and_failures(
        connection: MlflowConnection, jobs: dict[str, MlflowSyncJob], personas: dict[str, Any]) -> None:
    anonymous = Client()
    assert deliver(anonymous, connection.uid, created("9")).status_code == 202  # a delivery accepted...
    assert deliver(anonymous, connection.uid, created("9"), secret="forged-secret-000000000").status_code == 401
    content = _as(personas["admin"]).get(PAGE).content.decode()
    assert connection.tracking_uri in content and 'data-testid="connection-state">active<' in content
    webhook = content[content.index('data-testid="webhook-status"'):]
    webhook = webhook[:webhook.index("</dd>")]
    assert "registered on the server (id <code>wh-1</code>)" in webhook and "last delivery accepted" in webhook
    assert "1 refused in the last 24 hours" in webhook
    assert "not yet (it runs every minute" in content  # never reconciled
    failures = content[content.index('data-testid="sync-failures"'):]
    assert failures.count('data-testid="sync-failure"') == 3, "failed, retrying, refused: not the done one"
    assert "churn/1" in failures and "gave up after 8 attempts" in failures and "churn/4" not in failures
    assert failures.count('data-testid="retry"') == 2, "a job the scan refused is not offered a retry"
    assert 'data-testid="disable-form"' in content and 'data-testid="connect-form"' in content
    counts = content[content.index('data-testid="job-counts"'):]
    assert counts.startswith('data-testid="job-counts">1 imported or already here, 1 under way, '
                             '<strong class="bad">3 failing</strong>')

    mlflow_sync.mlflow_reconcile()  # the server does not answer: the reconcile skips it, nothing is stamped
    connection.refresh_from_db()
    assert connection.reconciled_at is None


@pytest.mark.parametrize("persona,sees,acts", [
    ("admin", True, True),
    ("ds", True, False),
    ("approver1", True, False),
    ("compliance", True, False),
    ("viewer", True, False),
    ("outsider", False, False),
])
def test_every_role_sees_its_teams_connections_and_only_managers_act(
        connection: MlflowConnection, jobs: dict[str, MlflowSyncJob], personas: dict[str, Any], persona: str,
        sees: bool, acts: bool) -> None:
    response = _as(personas[persona]).get(PAGE)
    if persona == "compliance" and response.status_code == 403:
        pytest.fail("a compliance officer of the team reads the connections too")
    assert response.status_code == 200
    content = response.content.decode()
    assert (connection.tracking_uri in content) is sees
    assert ('data-testid="no-connections"' in content) is (not sees)
    for form in ('data-testid="disable-form"', 'data-testid="connect-form"', 'data-testid="retry"'):
        assert (form in content) is acts, form


def test_anonymous_is_sent_to_sign_in() -> None:
    response = Client().get(PAGE)
    assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.parametrize("persona,status", [("ds", 403), ("approver1", 403), ("compliance", 403), ("viewer", 403),
                                            ("outsider", 404)])
def test_retry_and_disable_are_refused_to_every_other_role_and_change_nothing(
        connection: MlflowConnection, jobs: dict[str, MlflowSyncJob], personas: dict[str, Any], persona: str,
        status: int) -> None:
    client = _as(personas[persona])
    assert client.post(f"/integrations/mlflow/jobs/{jobs['failed'].uid}/retry").status_code == status
    assert client.post(f"/integrations/mlflow/{connection.uid}/disable").status_code == status
    assert client.post("/integrations/mlflow/connect", {"team": "acme", "tracking_uri": "http://127.0.0.1:1"}
                       ).status_code == 403
    jobs["failed"].refresh_from_db()
    connection.refresh_from_db()
    assert jobs["failed"].status == "failed" and jobs["failed"].attempts == 8 and connection.active
    assert not MlflowConnection.objects.exclude(pk=connection.pk).exists()
    assert not AuditEvent.objects.filter(action__in=["mlflow.job_retry", "mlflow.disconnect", "mlflow.connect"]
                                         ).exists()


def test_an_administrator_retries_a_failed_job_audited_and_not_a_refused_one(
        connection: MlflowConnection, jobs: dict[str, MlflowSyncJob], personas: dict[str, Any]) -> None:
    client = _as(personas["admin"])
    response = client.post(f"/integrations/mlflow/jobs/{jobs['failed'].uid}/retry", follow=True)
    assert "churn/1 is queued again." in response.content.decode()
    job = MlflowSyncJob.objects.get(pk=jobs["failed"].pk)
    assert (job.status, job.attempts) == ("pending", 0)
    event = AuditEvent.objects.get(action="mlflow.job_retry")
    assert event.actor_username == personas["admin"].username and event.target_id == str(connection.uid)
    assert event.before["status"] == "failed" and event.before["attempts"] == 8
    assert event.after["mlflow_version"] == "1"

    refused = client.post(f"/integrations/mlflow/jobs/{jobs['refused'].uid}/retry", follow=True)
    assert "A job that is refused by the scan is not retried." in refused.content.decode()
    assert MlflowSyncJob.objects.get(pk=jobs["refused"].pk).status == "refused"
    assert AuditEvent.objects.filter(action="mlflow.job_retry").count() == 1


def test_disabling_refuses_further_deliveries_keeps_the_history_and_is_audited(
        connection: MlflowConnection, jobs: dict[str, MlflowSyncJob], personas: dict[str, Any]) -> None:
    client = _as(personas["admin"])
    response = client.post(f"/integrations/mlflow/{connection.uid}/disable", follow=True)
    content = response.content.decode()
    assert f"The connection to {connection.tracking_uri} is disabled" in content
    assert 'data-testid="connection-state">disabled<' in content and "disabled: deliveries are refused" in content
    assert 'data-testid="disable-form"' not in content and 'data-testid="retry"' not in content
    connection.refresh_from_db()
    assert connection.active is False and MlflowSyncJob.objects.filter(connection=connection).count() == 4
    event = AuditEvent.objects.get(action="mlflow.disconnect")
    assert event.before == {"active": True} and event.after["active"] is False
    assert event.after["webhook_removed"] is False and event.after["webhook_problem"], \
        "the server did not answer: the event says the webhook may still be there"
    refused = deliver(Client(), connection.uid, created("10"))
    assert refused.status_code == 401 and "unknown connection" in refused.content.decode()
    again = client.post(f"/integrations/mlflow/{connection.uid}/disable", follow=True)
    assert "is already disabled" in again.content.decode()
    assert AuditEvent.objects.filter(action="mlflow.disconnect").count() == 1
    retried = client.post(f"/integrations/mlflow/jobs/{jobs['failed'].uid}/retry", follow=True)
    assert "Its connection is disabled" in retried.content.decode()


def test_a_bad_address_or_an_unreachable_server_is_said_plainly_and_nothing_is_made(
        personas: dict[str, Any]) -> None:
    client = _as(personas["admin"])
    response = client.post("/integrations/mlflow/connect", {"team": "acme", "tracking_uri": "ftp://x",
                                                            "write_back": "on"}, follow=True)
    content = response.content.decode()
    assert response.status_code == 200 and "Give the tracking server&#x27;s http(s) address" in content
    assert 'value="ftp://x"' in content, "what was typed is kept"
    away = f"http://127.0.0.1:{free_port()}"
    content = client.post("/integrations/mlflow/connect", {"team": "acme", "tracking_uri": away},
                          follow=True).content.decode()
    assert away in content and "did not answer" in content
    other = client.post("/integrations/mlflow/connect", {"team": "no-such-team", "tracking_uri": away})
    assert other.status_code == 404
    assert not MlflowConnection.objects.exists()
    assert not AuditEvent.objects.filter(action="mlflow.connect").exists()
