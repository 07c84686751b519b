"""Registry pages for each persona: lists, registration, model and version detail, the upload page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from portal.models import Team
from registry import services
from tests.registry import files

pytestmark = pytest.mark.django_db


@pytest.fixture
def churn_with_version(personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"],
                            description="Predicts churn.")
    api_as(personas["ds"]).post("/api/v1/models/churn/versions/", {
        "file": SimpleUploadedFile("f.skops", files.forest_skops_file(tmp_path / "f.skops").read_bytes()),
        "metrics": '{"auc": 0.91}', "intended_use": "<script>alert(1)</script>Retention offers"}, format="multipart")


PAGES = ["/models/", "/models/churn/", "/models/churn/versions/1/", "/models/churn/upload", "/models/new"]
EXPECTED = {
    None: [302, 302, 302, 302, 302],
    "outsider": [200, 404, 404, 404, 200],
    "viewer": [200, 200, 200, 403, 403],
    "ds": [200, 200, 200, 200, 200],
    "approver1": [200, 200, 200, 403, 403],
    "compliance": [200, 200, 200, 403, 403],
    "admin": [200, 200, 200, 200, 200],
}


@pytest.mark.parametrize("persona", list(EXPECTED), ids=[str(p) for p in EXPECTED])
def test_registry_pages_per_role(client: Client, personas: dict[str, Any], churn_with_version: None,
                                 persona: str | None) -> None:
    if persona:
        client.force_login(personas[persona])
    assert [client.get(p).status_code for p in PAGES] == EXPECTED[persona]


def test_the_model_card_is_escaped_and_the_trust_form_is_for_approvers_only(client: Client, personas: dict[str, Any],
                                                                             churn_with_version: None) -> None:
    client.force_login(personas["ds"])
    page = client.get("/models/churn/versions/1/").content.decode()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "sklearn.tree._tree.Tree" in page and 'data-testid="trust-form"' not in page
    client.force_login(personas["approver1"])
    assert 'data-testid="trust-form"' in client.get("/models/churn/versions/1/").content.decode()


def test_a_trust_decision_from_the_page(client: Client, personas: dict[str, Any], churn_with_version: None) -> None:
    client.force_login(personas["approver1"])
    response = client.post("/models/churn/versions/1/trust", {"decision": "refuse", "reason": "Unknown provenance."},
                           follow=True)
    assert b"Your decision is recorded." in response.content and b"Rejected" in response.content
    client.force_login(personas["ds"])
    assert client.post("/models/churn/versions/1/trust", {"decision": "trust", "reason": "x" * 20}).status_code == 403


def test_the_model_page_charts_metrics_from_local_plotly(client: Client, personas: dict[str, Any],
                                                          churn_with_version: None) -> None:
    client.force_login(personas["ds"])
    page = client.get("/models/churn/").content.decode()
    assert 'id="metrics-data"' in page and "/static/vendor/plotly/plotly-cartesian.min.js" in page
    assert "https://" not in page


def test_registering_from_the_page_validates(client: Client, personas: dict[str, Any]) -> None:
    client.force_login(personas["ds"])
    bad = client.post("/models/new", {"name": "Not OK", "team": "acme"})
    assert bad.status_code == 400 and b"lowercase letters" in bad.content
    other_team = client.post("/models/new", {"name": "ok-name", "team": "other"})
    assert other_team.status_code == 400
    good = client.post("/models/new", {"name": "ok-name", "team": "acme", "tags": "a, b"})
    assert good.status_code == 302 and good.headers["Location"] == "/models/ok-name/upload"


def test_the_model_list_filters(client: Client, personas: dict[str, Any], churn_with_version: None) -> None:
    client.force_login(personas["compliance"])
    assert b"churn" in client.get("/models/", {"q": "chu"}).content
    assert b"churn" not in client.get("/models/", {"q": "zzz"}).content
    assert b"churn" not in client.get("/models/", {"team": "other"}).content


def test_the_schedule_form_lists_every_problem_at_once_and_keeps_what_was_typed(
        client: Client, personas: dict[str, Any]) -> None:
    services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    client.force_login(personas["ds"])
    typed = {"name": "nightly scores", "environment": "stage", "location": "../etc/", "cron": "every night",
             "id_column": "customer", "subject_column": "person"}
    response = client.post("/models/churn/batch/schedules", typed)
    assert response.status_code == 400
    content = response.content.decode()
    errors = content[content.index('data-testid="schedule-errors"'):]
    errors = errors[:errors.index("</ul>")]
    assert "Location: The location must stay inside the team&#x27;s batch inbox" in errors
    assert "Give five fields" in errors, "the cron problem is listed with the location's"
    for field in ("name", "location", "cron", "id_column", "subject_column"):
        assert f'value="{typed[field]}"' in content, field
    assert '<option value="stage" selected>' in content
    ok = client.post("/models/churn/batch/schedules", {**typed, "location": "nightly/", "cron": "0 2 * * *"})
    assert ok.status_code == 302
    again = client.post("/models/churn/batch/schedules", {**typed, "location": "nightly/", "cron": "0 2 * * *"})
    assert again.status_code == 400 and "already has a schedule named" in again.content.decode()
