"""An administrator manages the team's MLflow connection in Chromium against a real ``mlflow server`` (SQLite store,
on a free port): connects it from the page (the webhook appears on the server), sees a failed import and retries it,
disables the connection (the webhook leaves the server); a data scientist of the team reads the same page without
any of the controls. Screenshots at 412 and 1,366 px; axe finds no violation of any impact."""

from __future__ import annotations

from typing import Any

import pytest
from mlflow import MlflowClient

from portal.models import AuditEvent
from registry.models import MlflowConnection, MlflowSyncJob, MlflowSyncStatus
from tests.browser.test_accessibility import AXE, RUN_AXE
from tests.browser.test_truth_journeys import document
from tests.browser.test_upload_journey import _sign_in
from tests.registry.test_mlflow_sync import mlflow_server  # noqa: F401 - fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _axe(page: Any) -> list[str]:
    page.add_script_tag(content=AXE.read_text())
    return list(page.evaluate(RUN_AXE))


def test_an_administrator_connects_retries_and_disables_an_mlflow_server(
        browser: Any, live_server: Any, personas: dict[str, Any], mlflow_server: str) -> None:  # noqa: F811
    context = browser.new_context(base_url=live_server.url, bypass_csp=True)  # to inject axe
    page = context.new_page()
    _sign_in(page, "ada")
    page.click("nav.mainnav >> text=MLflow")
    page.wait_for_selector("[data-testid=no-connections]")

    page.fill("#connect-uri", mlflow_server)
    page.fill("#connect-portal", live_server.url)
    with page.expect_navigation():
        page.click("[data-testid=connect-submit]")
    assert "is connected to " + mlflow_server in page.inner_text(".messages")
    connection = MlflowConnection.objects.get()
    hooks = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server).list_webhooks()
    assert [h.webhook_id for h in hooks] == [connection.webhook_id], "the webhook is on the server"
    assert hooks[0].url == connection.webhook_url and hooks[0].url.startswith(live_server.url)
    card = page.locator(f"[data-connection='{connection.uid}']")
    assert card.locator("[data-testid=connection-state]").inner_text() == "active"
    assert f"id {connection.webhook_id}" in card.locator("[data-testid=webhook-status]").inner_text()

    # An import that gave up (its worker's tries are in test_mlflow_webhook): shown with its error, retried here.
    job = MlflowSyncJob.objects.create(connection=connection, kind="import", registered_model="churn",
                                       mlflow_version="5", status=MlflowSyncStatus.FAILED, attempts=8,
                                       error="gave up after 8 attempts: RESOURCE_DOES_NOT_EXIST: churn version 5")
    page.reload()
    failure = page.locator("[data-testid=sync-failure]")
    assert failure.count() == 1 and "RESOURCE_DOES_NOT_EXIST" in failure.inner_text()
    assert not _axe(page)
    document(page, "mlflow-connections")
    page.set_viewport_size({"width": 1366, "height": 900})
    with page.expect_navigation():
        page.click("[data-testid=retry]")
    assert "churn/5 is queued again." in page.inner_text(".messages")
    job.refresh_from_db()
    assert job.status in ("pending", "running", "retrying", "failed", "done") and job.attempts <= 1, \
        "a fresh count of attempts (a worker may already have taken it)"
    assert AuditEvent.objects.filter(action="mlflow.job_retry", actor_username="ada").count() == 1

    # A data scientist of the team reads it, with none of the controls.
    reader = browser.new_context(base_url=live_server.url).new_page()
    _sign_in(reader, "dana")
    reader.goto("/integrations/mlflow/")
    assert mlflow_server in reader.inner_text(f"[data-connection='{connection.uid}']")
    for control in ("disable-form", "connect-form", "retry"):
        assert reader.locator(f"[data-testid={control}]").count() == 0, control
    reader.context.close()

    page.click("[data-testid=mlflow-connection] details.danger-zone summary")
    with page.expect_navigation():
        page.click("[data-testid=disable]")
    assert f"The connection to {mlflow_server} is disabled" in page.inner_text(".messages")
    assert page.locator("[data-testid=connection-state]").inner_text() == "disabled"
    assert list(MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server).list_webhooks()) == [], "the webhook left the server"
    event = AuditEvent.objects.get(action="mlflow.disconnect")
    assert event.after == {"active": False, "webhook_removed": True, "webhook_problem": ""}
    assert not _axe(page)
    context.close()
