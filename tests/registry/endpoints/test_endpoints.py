"""Multi-model endpoints (issue 38): one address routing each row to a team's model by ordered rules, checked
through the production entry point and the prediction log; rules edited through the API and the page, audited,
picked up by serving without a restart; rules naming another team's model, or a model not deployed, refused.

Three models of team ``acme`` answer a constant each (alpha 1, beta 2, gamma 3: linear regressions fitted to a
constant target, served by the in-process ONNX path), so every answer says which model gave it."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from typing import Any

import numpy as np
import pytest
from django.test import Client

from monitoring.flush import flush_predictions
from monitoring.models import PredictionLog
from portal import services as portal_services
from portal.models import AuditEvent, Team
from registry.endpoints import services as endpoints
from registry.models import Endpoint, ModelVersion
from registry.versions import services as versions
from tests.conftest import EntryPointClient, assert_error_shape
from tests.registry import files
from tests.registry.endpoints.conftest import CONSTANT

pytestmark = pytest.mark.django_db

URL = "/api/v1/serve/endpoints/front/dev/invocations"
RULES = [
    {"kind": "header_equals", "key": "X-Tenant", "values": ["gold"], "model": "gamma"},
    {"kind": "field_in", "key": "region", "values": ["eu", "uk"], "model": "alpha"},
    {"kind": "field_equals", "key": "segment", "values": [2], "model": "gamma"},
    {"kind": "share", "percent": 30, "model": "alpha"},
]
DEFAULT = "beta"


@pytest.fixture
def front(three_models: dict[str, ModelVersion], personas: dict[str, Any]) -> Endpoint:
    return endpoints.endpoint_create(team=Team.objects.get(slug="acme"), name="front", environment="dev",
                                     default_model=DEFAULT, rules=endpoints.rules_from_data(RULES),
                                     actor=personas["ds"])


@pytest.fixture
def scorer(personas: dict[str, Any]) -> Client:
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="endpoint", actor=personas["ds"])
    return EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")


def _bucket(key: str) -> int:
    """The share rules' bucket of a routing key, as documented: BLAKE2b (2 bytes), big-endian, modulo 100."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=2).digest(), "big") % 100


def expected_model(row: dict[str, Any], *, tenant: str, key: str) -> str:
    if tenant == "gold":
        return "gamma"
    if row["region"] in ("eu", "uk"):
        return "alpha"
    if float(row["segment"]) == 2:
        return "gamma"
    if _bucket(key) < 30:
        return "alpha"
    return DEFAULT


def _body(form: str, columns: list[str], rows: list[dict[str, Any]]) -> tuple[bytes, str]:
    if form == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)
        return out.getvalue().encode(), "text/csv"
    if form == "records":
        return json.dumps({"dataframe_records": rows}).encode(), "application/json"
    return json.dumps({"dataframe_split": {"columns": columns, "data": [[row[c] for c in columns] for row in rows]}
                       }).encode(), "application/json"


def _drain() -> None:
    while flush_predictions():
        pass


def test_an_endpoint_routes_ten_thousand_mixed_rows_each_to_the_right_model_as_the_log_shows(
        front: Endpoint, scorer: Client) -> None:
    """400 requests of 25 rows: JSON split, records and CSV bodies; some with the gold tenant header, every row
    with its own region and segment, a routing key each (the share rule). Every row's answer is its model's
    constant, the answer names that model and version, and the prediction log holds each row once under it."""
    X, _y = files._data()
    inputs = X.head(25).to_dict(orient="records")
    feature_columns = list(X.columns)
    rng = np.random.default_rng(38)
    regions = ["eu", "uk", "us", "jp", "br"]
    expected: dict[str, str] = {}
    seen_models: set[str] = set()
    split_requests = 0
    for i in range(400):
        tenant = "gold" if i % 10 == 0 else "standard"
        key = f"customer-{i}"
        form = ("split", "records", "csv")[i % 3]
        rows = [{**inputs[j], "region": regions[int(rng.integers(5))], "segment": int(rng.integers(4))}
                for j in range(25)]
        body, content_type = _body(form, [*feature_columns, "region", "segment"], rows)
        response = scorer.post(URL, body, content_type=content_type, HTTP_X_TENANT=tenant, HTTP_X_ROUTING_KEY=key)
        assert response.status_code == 200, response.content[:500]
        answer = response.json()
        want = [expected_model(row, tenant=tenant, key=key) for row in rows]
        assert answer["models"] == want, (i, form)
        assert [round(p, 6) for p in answer["predictions"]] == [CONSTANT[m] for m in want]
        assert answer["model_versions"] == [1] * 25
        split_requests += len(set(want)) > 1
        seen_models.update(want)
        expected.update(zip(answer["prediction_ids"], want, strict=True))
    assert len(expected) == 10_000 and seen_models == set(CONSTANT)
    assert split_requests > 100  # most requests mixed models, so both paths (whole and split) were taken
    _drain()
    logged = dict(PredictionLog.objects.filter(pk__in=list(expected)).values_list("id", "model_name"))
    assert logged == expected
    outputs = dict(PredictionLog.objects.filter(pk__in=list(expected)).values_list("id", "output"))
    assert all(round(outputs[pid], 6) == CONSTANT[model] for pid, model in expected.items())


def test_a_rule_change_is_picked_up_without_a_restart_and_audited(front: Endpoint, scorer: Client,
                                                                  personas: dict[str, Any], api_as: Any) -> None:
    X, _y = files._data()
    row = {**X.head(1).to_dict(orient="records")[0], "region": "eu", "segment": 0}
    body, content_type = _body("split", [*X.columns, "region", "segment"], [row])
    assert scorer.post(URL, body, content_type=content_type).json()["models"] == ["alpha"]
    client = api_as(personas["ds"])
    before = AuditEvent.objects.count()
    changed = client.put("/api/v1/endpoints/front/dev/", {
        "rules": [{"kind": "field_equals", "key": "region", "values": ["eu"], "model": "gamma"}],
        "default": "beta"}, format="json")
    assert changed.status_code == 200, changed.content
    assert changed.json()["rules"] == [{"kind": "field_equals", "model": "gamma", "key": "region", "values": ["eu"]}]
    event = AuditEvent.objects.order_by("-seq").first()
    assert AuditEvent.objects.count() == before + 1 and event is not None and event.action == "endpoint.change"
    assert event.before["rules"][1]["model"] == "alpha" and event.after["rules"][0]["model"] == "gamma"
    deadline = time.monotonic() + 3
    models: list[str] = []
    while time.monotonic() < deadline:  # the same process, never restarted: the generation check sees the change
        models = scorer.post(URL, body, content_type=content_type).json()["models"]
        if models == ["gamma"]:
            break
        time.sleep(0.1)
    assert models == ["gamma"]


def test_a_rule_naming_another_teams_model_or_one_not_deployed_is_refused_and_nothing_changes(
        front: Endpoint, personas: dict[str, Any], api_as: Any) -> None:
    other = Team.objects.get_or_create(slug="other", defaults={"name": "Other"})[0]
    versions.model_register(name="rival", team=other, actor=personas["outsider"])
    versions.model_register(name="idle", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    client = api_as(personas["admin"])  # an admin sees both teams, and is still refused
    before = (AuditEvent.objects.count(), list(front.rules.values_list("kind", "model__name")))
    for name, reason in (("rival", "has no model named 'rival'"), ("idle", "idle is not deployed in dev")):
        response = client.put("/api/v1/endpoints/front/dev/", {
            "rules": [{"kind": "share", "percent": 50, "model": name}]}, format="json")
        assert response.status_code == 400, response.content
        assert_error_shape(response, 400)
        assert reason in json.dumps(response.json())
        created = client.post("/api/v1/endpoints/", {"name": f"with-{name}", "environment": "dev", "team": "acme",
                                                     "default": name}, format="json")
        assert created.status_code == 400 and reason in json.dumps(created.json())
    assert (AuditEvent.objects.count(), list(front.rules.values_list("kind", "model__name"))) == before
    assert not Endpoint.objects.filter(name__startswith="with-").exists()
    # The outsider cannot route acme's endpoint to their model either: acme's endpoint does not exist for them.
    assert api_as(personas["outsider"]).put("/api/v1/endpoints/front/dev/", {"rules": []},
                                            format="json").status_code == 404


@pytest.mark.parametrize("rules, says", [
    ([{"kind": "share", "percent": 70, "model": "alpha"}, {"kind": "share", "percent": 40, "model": "beta"}],
     "add up to 110%"),
    ([{"kind": "field_equals", "key": "region", "values": ["eu", "uk"], "model": "alpha"}], "one value"),
    ([{"kind": "header_equals", "key": "X Bad", "values": ["a"], "model": "alpha"}], "Name the header"),
    ([{"kind": "regex", "key": "region", "values": ["a"], "model": "alpha"}], "regex"),
])
def test_bad_rules_get_a_clear_400(front: Endpoint, personas: dict[str, Any], api_as: Any,
                                   rules: list[dict[str, Any]], says: str) -> None:
    response = api_as(personas["ds"]).put("/api/v1/endpoints/front/dev/", {"rules": rules}, format="json")
    assert response.status_code == 400 and says in json.dumps(response.json()), response.content


def test_rules_are_edited_on_the_page_and_bad_input_changes_nothing(front: Endpoint,
                                                                    personas: dict[str, Any]) -> None:
    client = Client()
    client.force_login(personas["ds"])
    page = client.get("/endpoints/front/dev/")
    assert page.status_code == 200 and b'data-testid="endpoint-rules-form"' in page.content
    saved = client.post("/endpoints/front/dev/rules", {
        "kind-0": "field_in", "key-0": "region", "values-0": "eu, fr", "model-0": "beta",
        "kind-1": "share", "percent-1": "25", "model-1": "gamma", "default": "alpha"}, follow=True)
    assert b"The rules are saved" in saved.content
    front.refresh_from_db()
    assert endpoints.endpoint_summary(front)["rules"] == [
        {"kind": "field_in", "model": "beta", "key": "region", "values": ["eu", "fr"]},
        {"kind": "share", "model": "gamma", "percent": 25}]
    assert front.default_model is not None and front.default_model.name == "alpha"
    refused = client.post("/endpoints/front/dev/rules", {"kind-0": "share", "percent-0": "many", "model-0": "beta",
                                                         "default": "alpha"}, follow=True)
    assert b"Nothing was changed" in refused.content
    assert len(endpoints.endpoint_summary(front)["rules"]) == 2
    viewer = Client()
    viewer.force_login(personas["viewer"])
    assert viewer.post("/endpoints/front/dev/rules", {"default": "beta"}).status_code == 403
    assert b"endpoint-rules-form" not in viewer.get("/endpoints/front/dev/").content


def test_a_request_routed_to_a_model_no_longer_served_answers_404_not_deployed(
        front: Endpoint, scorer: Client, personas: dict[str, Any]) -> None:
    from registry.models import EnvironmentState

    EnvironmentState.objects.filter(model__name="gamma").update(champion=None, generation=99)
    X, _y = files._data()
    row = {**X.head(1).to_dict(orient="records")[0], "region": "us", "segment": 2}
    body, content_type = _body("split", [*X.columns, "region", "segment"], [row])
    response = scorer.post(URL, body, content_type=content_type)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_deployed"
    assert "gamma" in response.json()["message"]


def test_an_endpoint_is_created_read_and_deleted_through_the_api_each_change_audited(
        three_models: dict[str, ModelVersion], personas: dict[str, Any], api_as: Any) -> None:
    client = api_as(personas["ds"])
    created = client.post("/api/v1/endpoints/", {"name": "churn-router", "environment": "dev", "team": "acme",
                                                 "default": "alpha", "rules": RULES[1:3]}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["invocations"] == "/api/v1/serve/endpoints/churn-router/dev/invocations"
    assert [r["model"] for r in body["rules"]] == ["alpha", "gamma"] and body["default"] == "alpha"
    assert client.post("/api/v1/endpoints/", {"name": "churn-router", "environment": "dev", "team": "acme",
                                              "default": "alpha"}, format="json").status_code == 400  # taken
    viewer = api_as(personas["viewer"])
    assert [e["name"] for e in viewer.get("/api/v1/endpoints/").json()] == ["churn-router"]
    assert viewer.get("/api/v1/endpoints/churn-router/dev/").json()["rules"] == body["rules"]
    assert viewer.delete("/api/v1/endpoints/churn-router/dev/").status_code == 403
    assert api_as(personas["outsider"]).get("/api/v1/endpoints/churn-router/dev/").status_code == 404
    assert client.delete("/api/v1/endpoints/churn-router/dev/").status_code == 204
    actions = list(AuditEvent.objects.filter(target_type="endpoint").order_by("seq").values_list("action", flat=True))
    assert actions == ["endpoint.create", "endpoint.delete"]
    # stage is a team manager's: a data scientist may not route stage traffic, whatever serves there
    refused = client.post("/api/v1/endpoints/", {"name": "staged", "environment": "stage", "team": "acme",
                                                 "default": "alpha"}, format="json")
    assert refused.status_code == 403


def test_a_group_of_rows_for_a_model_mlflow_answers_is_sent_in_the_requests_own_form() -> None:
    from registry.serving import protocol
    from registry.serving.endpoints import _subset, reencoded

    for content_type, body in (
            ("text/csv", b"a,region\n1.5,eu\n,us\n3,uk\n"),
            ("application/json", json.dumps({"dataframe_records": [{"a": 1, "region": "eu"}, {"a": 2, "region": "us"},
                                                                   {"a": 3, "region": "uk"}],
                                             "params": {"k": 1}}).encode()),
            ("application/json", json.dumps({"dataframe_split": {"columns": ["a", "region"],
                                                                 "data": [[1, "eu"], [2, "us"], [3, "uk"]]}}).encode()),
            ("application/json", json.dumps({"inputs": {"a": [1, 2, 3], "region": ["eu", "us", "uk"]}}).encode())):
        parsed = protocol.parse(content_type, body)
        sub = _subset(parsed, [0, 2])
        again_body, again_type = reencoded(sub)
        again = protocol.parse(again_type, again_body)
        assert again_type == (content_type if content_type == "text/csv" else "application/json")
        assert again.rows == sub.rows and again.columns == sub.columns and again.params == sub.params


def test_the_endpoints_page_creates_one_for_those_who_deploy_and_lists_it_for_the_team(
        three_models: dict[str, ModelVersion], personas: dict[str, Any]) -> None:
    client = Client()
    client.force_login(personas["ds"])
    page = client.get("/endpoints/")
    assert page.status_code == 200 and b'data-testid="endpoint-create-form"' in page.content
    made = client.post("/endpoints/new", {"team": "acme", "name": "web", "environment": "dev", "default": "beta"},
                       follow=True)
    assert made.redirect_chain[-1][0] == "/endpoints/web/dev/"
    assert b"/api/v1/serve/endpoints/web/dev/invocations" in made.content
    refused = client.post("/endpoints/new", {"team": "acme", "name": "web2", "environment": "dev",
                                             "default": "nothing-here"}, follow=True)
    assert b"has no model named" in refused.content and not Endpoint.objects.filter(name="web2").exists()
    viewer = Client()
    viewer.force_login(personas["viewer"])
    listing = viewer.get("/endpoints/")
    assert b'href="/endpoints/web/dev/"' in listing.content and b"endpoint-create-form" not in listing.content
