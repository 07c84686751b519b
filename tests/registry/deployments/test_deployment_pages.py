"""Deployment pages per persona: environment status on the model page, Deploy to dev, the live deployment page."""

from __future__ import annotations

import ast
import json
import shlex
from typing import Any

import pytest
from django.test import Client

from portal import services as portal_services
from registry.models import Deployment, ModelVersion
from tests.conftest import EntryPointClient
from tests.registry.conftest import deploy_now as _deploy

pytestmark = pytest.mark.django_db


def test_the_model_page_shows_what_serves_each_environment(client: Client, personas: dict[str, Any],
                                                           two_versions: list[ModelVersion]) -> None:
    _deploy(two_versions[0], personas["ds"])
    _deploy(two_versions[1], personas["ds"], strategy="canary", traffic_percent=20)
    client.force_login(personas["viewer"])
    page = client.get("/models/churn/").content.decode()
    assert "v1 and v2 (canary)" in page and "20% to v2" in page


DEPLOY_STATUS = {"outsider": 404, "viewer": 403, "approver1": 403, "compliance": 403, "ds": 302, "admin": 302}


@pytest.mark.parametrize("persona,status", list(DEPLOY_STATUS.items()))
def test_deploy_to_dev_from_the_version_page_per_role(client: Client, personas: dict[str, Any],
                                                      two_versions: list[ModelVersion], persona: str,
                                                      status: int) -> None:
    client.force_login(personas[persona])
    response = client.post("/models/churn/versions/1/deploy", {"strategy": "replace"})
    assert response.status_code == status
    if status == 302:
        deployment = Deployment.objects.get()
        assert response.headers["Location"] == f"/deployments/{deployment.uid}/"
        assert client.get(response.headers["Location"]).status_code == 200
    else:
        assert not Deployment.objects.exists()


def test_the_deploy_form_is_only_for_data_scientists_and_explains_errors(client: Client, personas: dict[str, Any],
                                                                         two_versions: list[ModelVersion]) -> None:
    client.force_login(personas["ds"])
    assert 'data-testid="deploy-form"' in client.get("/models/churn/versions/1/").content.decode()
    refused = client.post("/models/churn/versions/1/deploy", {"strategy": "canary", "traffic_percent": "10"},
                          follow=True)
    assert b"Nothing serves dev yet" in refused.content
    client.force_login(personas["approver1"])
    assert 'data-testid="deploy-form"' not in client.get("/models/churn/versions/1/").content.decode()


def test_deployment_pages_are_scoped_to_teams(client: Client, personas: dict[str, Any],
                                              two_versions: list[ModelVersion]) -> None:
    deployment = _deploy(two_versions[0], personas["ds"])
    client.force_login(personas["outsider"])
    assert client.get(f"/deployments/{deployment.uid}/").status_code == 404
    client.force_login(personas["compliance"])
    page = client.get(f"/deployments/{deployment.uid}/").content.decode()
    assert "Live in dev" in page and 'data-status-url="/api/v1/deployments/' in page


def _curl_body(curl: str) -> dict[str, Any]:
    """The JSON a shell would send: the argument after --data, unquoted as a POSIX shell unquotes it."""
    words = shlex.split(curl.replace("\\\n", " "))
    return json.loads(words[words.index("--data") + 1])


def test_the_environment_page_shows_a_call_example_that_scores(client: Client, personas: dict[str, Any],
                                                              two_versions: list[ModelVersion]) -> None:
    _deploy(two_versions[0], personas["ds"])
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="page", actor=personas["ds"])
    client.force_login(personas["ds"])
    response = client.get("/models/churn/environments/dev/")
    html = response.content.decode()
    call = response.context["call"]
    url = "http://testserver/api/v1/serve/churn/dev/invocations"
    assert call.url == url and f'data-testid="call-url" class="url">{url}</code>' in html
    assert '"Authorization: Bearer $PORTAL_TOKEN"' in call.curl and plaintext not in html and "mlp_" not in html
    assert 'href="/account/" data-testid="token-link"' in html and "Your role reads only" not in html
    body = _curl_body(call.curl)
    example = two_versions[0].input_example
    assert isinstance(example, dict)
    assert call.source == "example" and body == {"dataframe_split": {"columns": example["columns"],
                                                                     "data": example["data"][:3]}}
    python = ast.parse(call.python)
    keywords = {k.arg: k.value for node in ast.walk(python) if isinstance(node, ast.Call) for k in node.keywords}
    assert ast.literal_eval(keywords["json"]) == body
    assert "os.environ['PORTAL_TOKEN']" in call.python

    scoring = EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    answer = scoring.post("/api/v1/serve/churn/dev/invocations", json.dumps(body), content_type="application/json")
    assert answer.status_code == 200, answer.content
    assert len(answer.json()["predictions"]) == len(body["dataframe_split"]["data"])


def test_the_call_example_escapes_the_example_and_hides_sensitive_values(client: Client, personas: dict[str, Any],
                                                                         two_versions: list[ModelVersion]) -> None:
    _deploy(two_versions[0], personas["ds"])
    hostile = "</pre><script>alert('x')</script>"
    ModelVersion.objects.filter(pk=two_versions[0].pk).update(
        input_example={"columns": ["note", "email"], "data": [[hostile, "jane@example.org"]]},
        signature={"inputs": [{"name": "note", "type": "string"}, {"name": "email", "type": "string"}]},
        sensitive_columns={"email": "personal"})
    client.force_login(personas["viewer"])
    response = client.get("/models/churn/environments/dev/")
    html = response.content.decode()
    assert "<script>alert" not in html and "&lt;/pre&gt;&lt;script&gt;alert(" in html
    assert "jane@example.org" not in html and "placeholders in place of its sensitive columns (email)" in html
    call = response.context["call"]
    assert _curl_body(call.curl) == {"dataframe_split": {"columns": ["note", "email"], "data": [[hostile, "text"]]}}
    assert "Your role reads only" in html


def test_without_an_example_the_body_is_typed_by_the_signature(client: Client, personas: dict[str, Any],
                                                               two_versions: list[ModelVersion]) -> None:
    _deploy(two_versions[0], personas["ds"])
    ModelVersion.objects.filter(pk=two_versions[0].pk).update(input_example=None, signature={"inputs": [
        {"name": "plan", "type": "string"}, {"name": "age", "type": "long"}, {"name": "spend", "type": "double"},
        {"name": "active", "type": "boolean"}]})
    client.force_login(personas["ds"])
    response = client.get("/models/churn/environments/dev/")
    assert response.context["call"].source == "signature"
    assert _curl_body(response.context["call"].curl) == {
        "dataframe_split": {"columns": ["plan", "age", "spend", "active"], "data": [["text", 0, 0.0, False]]}}
    assert "placeholders, typed by its signature" in response.content.decode()


def test_an_idle_environment_names_its_url_and_the_model_and_monitoring_pages_link_to_the_example(
        client: Client, personas: dict[str, Any], two_versions: list[ModelVersion]) -> None:
    client.force_login(personas["ds"])
    idle = client.get("/models/churn/environments/stage/")
    assert idle.context["call"] is None
    assert "Nothing serves stage yet" in idle.content.decode()
    assert "http://testserver/api/v1/serve/churn/stage/invocations" in idle.content.decode()
    assert 'data-testid="call-link-dev"' not in client.get("/models/churn/").content.decode()
    _deploy(two_versions[0], personas["ds"])
    model_page = client.get("/models/churn/").content.decode()
    assert 'href="/models/churn/environments/dev/#call" data-testid="call-link-dev"' in model_page
    assert 'data-testid="call-link-stage"' not in model_page
    monitoring = client.get("/models/churn/environments/dev/monitoring").content.decode()
    assert 'href="/models/churn/environments/dev/#call" data-testid="call-link"' in monitoring
    client.force_login(personas["outsider"])
    assert client.get("/models/churn/environments/dev/").status_code == 404
