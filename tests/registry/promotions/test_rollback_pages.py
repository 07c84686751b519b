"""Rollback where people look: at the top of the environment page and on the timeline and promotion pages, one
permission sentence everywhere, a confirmation before anything changes; list pages say what serves now."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.test import Client

from portal.models import AuditEvent, Team
from registry.deployments import services as deployments
from registry.models import Deployment, RegisteredModel
from registry.versions import services
from tests.registry.conftest import deploy_now
from tests.registry.promotions.test_promotions import promote_live, upload


def _client(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_rollback_is_confirmed_first_and_worded_the_same_everywhere(personas: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    model: RegisteredModel = services.model_register(name="churn", team=Team.objects.get(slug="acme"),
                                                     actor=personas["ds"])
    v1 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.9})
    promote_live(v1, "stage", personas)
    v2 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.91}, c=0.5)
    second = promote_live(v2, "stage", personas)

    approver, ds = _client(personas["approver1"]), _client(personas["ds"])
    page = approver.get("/models/churn/environments/stage/").content.decode()
    assert page.index('data-testid="rollback"') < page.index('data-testid="call-example"'), "at the top"
    assert 'data-testid="rollback-form"' in page and 'data-testid="timeline-rollback"' in page
    refused = ds.get("/models/churn/environments/stage/").content.decode()
    wording = "Rolling stage back is for approvers and administrators; your role is not."
    assert wording in refused and 'data-testid="rollback-form"' not in refused
    assert wording in ds.get(f"/promotions/{second.uid}/").content.decode(), "the promotion page says the same"
    assert wording in ds.post("/models/churn/environments/stage/rollback", {"reason": "x", "confirm": "yes"},
                              follow=True).content.decode(), "and so does the refusal"

    events = AuditEvent.objects.count()
    confirm = approver.post("/models/churn/environments/stage/rollback", {"to_version": "1"})
    text = confirm.content.decode()
    assert confirm.status_code == 200 and 'data-testid="rollback-from">v2<' in text
    assert 'data-testid="rollback-to">v1<' in text
    assert AuditEvent.objects.count() == events and not Deployment.objects.filter(purpose="rollback").exists()
    no_reason = approver.post("/models/churn/environments/stage/rollback", {"to_version": "1", "confirm": "yes"})
    assert no_reason.status_code == 400 and not Deployment.objects.filter(purpose="rollback").exists()
    done = approver.post("/models/churn/environments/stage/rollback",
                         {"to_version": "1", "confirm": "yes", "reason": "v2 misbehaves"})
    rollback = Deployment.objects.get(purpose="rollback")
    assert done.headers["Location"] == f"/deployments/{rollback.uid}/"
    deployments.deployment_run(deployment_id=rollback.pk)

    # The promotions list and the promotion page follow what serves now.
    queue = approver.get("/promotions/?status=live").content.decode()
    assert "no longer serving: v1 serves now" in queue
    detail = approver.get(f"/promotions/{second.uid}/").content.decode()
    assert 'data-testid="promotion-replaced"' in detail and "v1 serves stage now" in detail
    deployment_page = approver.get(f"/deployments/{rollback.uid}/").content.decode()
    assert ">Rolled back</span>" in deployment_page
    assert 'data-testid="deployment-done">' in deployment_page and 'href="/models/churn/environments/stage/"' in \
        deployment_page


def test_rollback_of_dev_names_who_may_and_stage_needs_an_earlier_version(personas: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    model = services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    deploy_now(upload(model, personas["ds"], tmp_path), personas["ds"])
    viewer = _client(personas["viewer"]).get("/models/churn/environments/dev/").content.decode()
    assert ("Rolling dev back is for data scientists and administrators (rolling dev back is a dev deployment); "
            "your role is not.") in viewer
    only = _client(personas["ds"]).get("/models/churn/environments/dev/").content.decode()
    assert 'data-testid="rollback-none"' in only


def test_the_register_form_starts_on_a_users_only_team_and_names_the_name_rule(personas: dict[str, Any]) -> None:
    page = _client(personas["ds"]).get("/models/new").content.decode()
    assert "---------" not in page and 'value="acme" selected' in page
    assert 'title="1 to 100 lowercase letters, digits and hyphens' in page and 'pattern="' in page
