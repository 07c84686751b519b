"""Registry pages for each persona: lists, registration, model and version detail, the upload page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from portal.models import Team
from registry.versions import services
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
    # The smallest bundle its line chart needs (basic: scatter, bar, pie), not the cartesian one with heatmaps.
    assert 'id="metrics-data"' in page and "/static/vendor/plotly/plotly-basic.min.js" in page
    assert "plotly-cartesian" not in page
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


def _serve(version: Any, environment: str, challenger: Any = None, mode: str = "single", percent: int = 0) -> None:
    """What a finished deployment leaves behind: the environment's state naming the live deployments."""
    from registry.models import Deployment, EnvironmentState

    def live(v: Any) -> Deployment:
        return Deployment.objects.create(model=v.model, version=v, environment=environment, status="live",
                                         progress=100)

    EnvironmentState.objects.create(model=version.model, environment=environment, champion=live(version),
                                    challenger=live(challenger) if challenger else None, mode=mode,
                                    challenger_percent=percent)


def test_the_model_list_says_where_each_model_is_live_sorts_searches_and_pages(
        client: Client, personas: dict[str, Any], api_as: Any, churn_with_version: None, tmp_path: Path) -> None:
    from registry.models import ModelVersion

    team = Team.objects.get(slug="acme")
    api_as(personas["ds"]).post("/api/v1/models/churn/versions/", {
        "file": SimpleUploadedFile("s.skops", files.skops_file(tmp_path / "s.skops").read_bytes())},
        format="multipart")
    v1, v2 = ModelVersion.objects.filter(model__name="churn").order_by("number")
    _serve(v1, "dev", challenger=v2, mode="canary", percent=10)
    _serve(v1, "stage")
    for i in range(50):
        services.model_register(name=f"zz-model-{i:02d}", team=team, actor=personas["ds"],
                                tags=["bulk"] if i == 7 else [])
    client.force_login(personas["viewer"])
    first = client.get("/models/").content.decode()
    assert "51 models, page 1 of 2." in first and 'href="?&amp;page=2"' in first
    row = first[first.index('<tr data-model="churn">'):]
    live = row[row.index('data-testid="live"'):]
    live = live[:live.index("</td>")]
    assert "<strong>dev</strong> v1 + v2 canary 10%" in live and "<strong>stage</strong> v1" in live
    assert live.index("dev") < live.index("stage") and "prod" not in live
    assert "not live" in client.get("/models/", {"q": "zz-model-00"}).content.decode()
    by_versions = client.get("/models/", {"sort": "versions"}).content.decode()
    assert by_versions.index('data-model="churn"') < by_versions.index('data-model="zz-model-00"')
    descending = client.get("/models/", {"sort": "-name"}).content.decode()
    assert 'data-model="zz-model-49"' in descending and 'data-model="churn"' not in descending, "page 1 of 2"
    assert 'aria-sort="descending"' in descending
    tagged = client.get("/models/", {"q": "bulk"}).content.decode()
    assert 'data-model="zz-model-07"' in tagged and "1 model." in tagged
    assert client.get("/models/", {"sort": "nonsense"}).status_code == 200


def test_tags_are_edited_on_the_pages_and_the_api_audited_and_kept_when_refused(
        client: Client, personas: dict[str, Any], api_as: Any, churn_with_version: None) -> None:
    from portal.models import AuditEvent
    from registry.models import ModelVersion, RegisteredModel

    client.force_login(personas["ds"])
    refused = client.post("/models/churn/tags", {"tags": "pii, ok tag, <bad>, -also bad"}, follow=True)
    content = refused.content.decode()
    assert 'value="pii, ok tag, &lt;bad&gt;, -also bad"' in content, "what was typed is still in the field"
    assert "&#x27;&lt;bad&gt;&#x27; is not a tag" in content and "&#x27;-also bad&#x27; is not a tag" in content
    assert RegisteredModel.objects.get(name="churn").tags == []
    assert client.post("/models/churn/tags", {"tags": "pii, team:risk, pii"}).status_code == 302
    assert RegisteredModel.objects.get(name="churn").tags == ["pii", "team:risk"]
    event = AuditEvent.objects.get(action="model.tags_change")
    assert event.before == {"tags": []} and event.after == {"tags": ["pii", "team:risk"]}
    assert 'value="pii, team:risk"' in client.get("/models/churn/").content.decode()

    assert client.post("/models/churn/versions/1/tags", {"tags": "candidate"}).status_code == 302
    assert ModelVersion.objects.get(model__name="churn", number=1).tags == ["candidate"]
    assert AuditEvent.objects.filter(action="version.tags_change", target_id="churn/1").count() == 1

    expected = {None: (401, 403), "outsider": (404,), "viewer": (403,), "approver1": (403,), "compliance": (403,),
                "ds": (200,), "admin": (200,)}
    for persona, statuses in expected.items():
        api = api_as(personas[persona] if persona else None)
        response = api.put("/api/v1/models/churn/versions/1/tags", {"tags": ["by-api", persona or "anon"]},
                           format="json")
        assert response.status_code in statuses, (persona, response.content)
        page = Client()
        if persona:
            page.force_login(personas[persona])
        assert page.post("/models/churn/tags", {"tags": "x"}).status_code in (
            (302,) if persona in ("ds", "admin") else (404,) if persona == "outsider" else (403,) if persona else
            (302,)), persona
    assert api_as(personas["ds"]).get("/api/v1/models/churn/versions/1/").json()["tags"] == ["by-api", "admin"]
    bad = api_as(personas["ds"]).put("/api/v1/models/churn/tags", {"tags": "not-a-list"}, format="json")
    assert bad.status_code == 200, "a comma-separated string is taken too"
    wrong = api_as(personas["ds"]).put("/api/v1/models/churn/tags", {"tags": [1, 2]}, format="json")
    assert wrong.status_code == 400 and "list of strings" in wrong.json()["error"]["message"]


def test_two_versions_compared_side_by_side_and_the_reference_profile_on_the_version_page(
        client: Client, personas: dict[str, Any], churn_with_version: None, tmp_path: Path) -> None:
    from registry import storage
    from registry.models import ModelVersion, ReferenceData
    from registry.versions import profiling

    version = ModelVersion.objects.get(model__name="churn", number=1)
    csv_path = files.reference_csv(tmp_path / "ref.csv", rows=50)
    profile = profiling.profile_file(csv_path, "csv")
    blob = storage.blob_put_moved(csv_path, sha256=storage.sha256_of_file(csv_path)[0], size=csv_path.stat().st_size)
    reference = ReferenceData.objects.create(blob=blob, format="csv", rows=50, profile=profile)
    ModelVersion.objects.filter(pk=version.pk).update(reference=reference)
    client.force_login(personas["viewer"])
    page = client.get("/models/churn/versions/1/").content.decode()
    assert 'data-testid="reference-profile"' in page and "50 rows profiled" in page
    assert "<th scope=\"row\">mean radius</th><td>numeric</td><td>0 %</td>" in page
    assert 'data-testid="compare-link"' not in page, "one version: nothing to compare with"
    only_one = client.get("/models/churn/compare")
    assert only_one.status_code == 200 and "comparing needs two" in only_one.content.decode()

    client.force_login(personas["ds"])
    from registry.versions.localfiles import LocalUpload

    path = files.joblib_file(tmp_path / "m.joblib")
    services.version_upload(model=version.model, upload=LocalUpload(path, path.name),
                            meta=services.UploadMetadata(metrics={"auc": 0.95}, intended_use="Renewals"),
                            actor=personas["ds"])
    assert 'href="/models/churn/compare?a=1&amp;b=2"' in client.get("/models/churn/versions/2/").content.decode()
    assert 'data-testid="compare-link"' in client.get("/models/churn/").content.decode()
    compared = client.get("/models/churn/compare", {"a": 1, "b": 2}).content.decode()
    metrics = compared[compared.index('data-testid="compare-metrics"'):]
    assert '<tr data-metric="auc"><th scope="row">auc <span class="hint">higher is better</span></th>' \
           '<td>0.9100</td><td>0.9500</td>' in metrics and "0.0400" in metrics
    assert "Retention offers" in compared and "Renewals" in compared
    assert 'data-testid="compare-profile"' in compared and "mean radius" in compared
    assert client.get("/models/churn/compare", {"a": 2, "b": 2}).status_code == 400
    assert client.get("/models/churn/compare", {"a": 9, "b": 2}).status_code == 400
    outsider = Client()
    outsider.force_login(personas["outsider"])
    assert outsider.get("/models/churn/compare").status_code == 404
