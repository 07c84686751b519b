"""Deployment pages per persona: environment status on the model page, Deploy to dev, the live deployment page."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from registry.models import Deployment, ModelVersion
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
