"""Promotion: four eyes, policies, gates, re-authentication, rollback, the serving timeline and notifications."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from django.db import connection
from django.test import Client
from django.utils import timezone

from portal.models import AuditEvent, Team
from registry.deployments import services as deployments
from registry.models import (
    Deployment,
    ModelVersion,
    PromotionPolicy,
    PromotionRequest,
    RegisteredModel,
)
from registry.promotions import services as promotions
from registry.versions import services
from registry.versions.localfiles import LocalUpload
from tests.conftest import PASSWORD, assert_error_shape
from tests.registry import files
from tests.registry.conftest import deploy_now


def upload(model: RegisteredModel, actor: Any, tmp_path: Path, *, metrics: dict[str, float] | None = None,
           drop_last_column: bool = False, c: float = 1.0) -> ModelVersion:
    """A ready logistic regression on the breast-cancer data, with ``metrics``; optionally one input fewer."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = files._data()
    if drop_last_column:
        X = X.iloc[:, :-1]
    estimator = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500)).fit(X, y)
    n = model.versions.count() + 1
    path = files.joblib_file(tmp_path / f"m{n}.joblib", estimator)
    ref = tmp_path / f"ref{n}.csv"
    X.head(100).to_csv(ref, index=False)
    version = services.version_upload(model=model, upload=LocalUpload(path, path.name),
                                      reference=LocalUpload(ref, ref.name),
                                      meta=services.UploadMetadata(metrics=metrics or {}), actor=actor)
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", version.status_detail
    return version


def approve_all(promotion: PromotionRequest, approvers: list[Any]) -> PromotionRequest:
    for approver in approvers:
        promotion = promotions.promotion_decide(promotion=promotion, actor=approver, approve=True,
                                                comment="looks right", password=PASSWORD)
    return promotion


def run_deployment(promotion: PromotionRequest) -> PromotionRequest:
    promotion.refresh_from_db()
    assert promotion.deployment_id, promotion.status
    result = deployments.deployment_run(deployment_id=promotion.deployment_id)
    assert result is not None and result.status == "live", result.error if result else None
    promotion.refresh_from_db()
    return promotion


def promote_live(version: ModelVersion, target: str, personas: dict[str, Any]) -> PromotionRequest:
    promotion = promotions.promotion_request(version=version, target=target, reason=f"ship to {target}",
                                             actor=personas["ds"])
    approvers = [personas["approver1"], personas["approver2"]][: promotion.approvals_required]
    promotion = run_deployment(approve_all(promotion, approvers))
    assert promotion.status == "live"
    return promotion


@pytest.fixture
def model(personas: dict[str, Any]) -> RegisteredModel:
    return services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])


# --- Policy and four eyes -----------------------------------------------------------------------------------------

def test_policy_defaults_and_overrides_by_team_and_model(model: RegisteredModel) -> None:
    assert promotions.policy_for(model, "stage") == (1, 0.01)
    assert promotions.policy_for(model, "prod") == (2, 0.01)
    PromotionPolicy.objects.create(environment="prod", approvals_required=3, metric_tolerance=0.05)
    assert promotions.policy_for(model, "prod") == (3, 0.05)
    PromotionPolicy.objects.create(environment="prod", team=model.team, approvals_required=2, metric_tolerance=0.02)
    assert promotions.policy_for(model, "prod") == (2, 0.02)
    PromotionPolicy.objects.create(environment="prod", model=model, approvals_required=1, metric_tolerance=0.0)
    assert promotions.policy_for(model, "prod") == (1, 0.0)
    assert promotions.policy_for(model, "stage") == (1, 0.01)


def test_self_approval_is_refused_over_the_api_for_requester_and_uploader(
        model: RegisteredModel, personas: dict[str, Any], api_as: Any, make_user: Any, tmp_path: Path) -> None:
    from portal.roles import ADMIN

    version = upload(model, personas["ds"], tmp_path)
    boss = make_user("bo", ADMIN)  # an admin holds every capability, approving included
    response = api_as(boss).post(f"/api/v1/models/churn/versions/{version.number}/promote",
                                 {"target": "stage", "reason": "ready for stage"}, format="json")
    assert response.status_code == 201, response.content
    uid = response.json()["id"]
    assert response.json()["status"] == "pending" and response.json()["approvals_required"] == 1
    body = assert_error_shape(api_as(boss).post(f"/api/v1/promotions/{uid}/approve", {}, format="json"), 403)
    assert "requested" in body["error"]["message"]
    # The uploader holds no approve capability as a data scientist; as an admin they would still be refused.
    personas["ds"].groups.add(boss.groups.get())
    personas["ds"]._portal_roles = None
    body = assert_error_shape(api_as(personas["ds"]).post(f"/api/v1/promotions/{uid}/approve", {}, format="json"),
                              403)
    assert "uploaded" in body["error"]["message"]
    assert PromotionRequest.objects.get(uid=uid).status == "pending"
    assert not Deployment.objects.filter(environment="stage").exists()


def test_self_approval_is_refused_in_the_ui(model: RegisteredModel, personas: dict[str, Any], make_user: Any,
                                            tmp_path: Path) -> None:
    from portal.roles import ADMIN

    version = upload(model, personas["ds"], tmp_path)
    boss = make_user("bo", ADMIN)
    client = Client()
    client.force_login(boss)
    response = client.post(f"/models/churn/versions/{version.number}/promote",
                           {"target": "stage", "reason": "ready for stage"})
    promotion = PromotionRequest.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/promotions/{promotion.uid}/"
    page = client.get(f"/promotions/{promotion.uid}/")
    assert b'data-testid="decision-form"' not in page.content
    assert b"You requested this promotion" in page.content
    response = client.post(f"/promotions/{promotion.uid}/decide", {"decision": "approve"}, follow=True)
    assert b"You requested this promotion; someone else has to approve it." in response.content
    promotion.refresh_from_db()
    assert promotion.status == "pending" and not promotion.approvals.exists()


def test_prod_needs_stage_first_then_two_approvers_and_a_password(
        model: RegisteredModel, personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    version = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.95})
    ds = api_as(personas["ds"])
    body = assert_error_shape(ds.post(f"/api/v1/models/churn/versions/{version.number}/promote",
                                      {"target": "prod", "reason": "skip stage"}, format="json"), 400)
    assert "stage first" in body["error"]["message"]
    promote_live(version, "stage", personas)

    response = ds.post(f"/api/v1/models/churn/versions/{version.number}/promote",
                       {"target": "prod", "reason": "stage looked good for a week"}, format="json")
    assert response.status_code == 201, response.content
    uid = response.json()["id"]
    assert response.json()["approvals_required"] == 2
    first, second = api_as(personas["approver1"]), api_as(personas["approver2"])
    assert_error_shape(first.post(f"/api/v1/promotions/{uid}/approve", {"comment": "ok"}, format="json"), 403)
    assert_error_shape(first.post(f"/api/v1/promotions/{uid}/approve", {"password": "wrong-password-1"},
                                  format="json"), 403)
    assert AuditEvent.objects.filter(action="auth.reauth_failed", actor=personas["approver1"]).count() == 2
    response = first.post(f"/api/v1/promotions/{uid}/approve", {"comment": "ok", "password": PASSWORD},
                          format="json")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "pending", "one approval is not enough for prod"
    # Nobody approves twice.
    body = assert_error_shape(first.post(f"/api/v1/promotions/{uid}/approve", {"password": PASSWORD},
                                         format="json"), 403)
    assert "already decided" in body["error"]["message"]
    response = second.post(f"/api/v1/promotions/{uid}/approve", {"comment": "agreed", "password": PASSWORD},
                           format="json")
    assert response.json()["status"] == "deploying"
    assert [a["reauthenticated"] for a in response.json()["approvals"]] == [True, True]
    promotion = run_deployment(PromotionRequest.objects.get(uid=uid))
    assert promotion.status == "live"
    assert promotions.champion_version(model, "prod") == version
    actions = list(AuditEvent.objects.filter(target_id=uid, action__startswith="promotion.").order_by("pk")
                   .values_list("action", flat=True))
    assert actions == ["promotion.request", "promotion.approve", "promotion.approve", "promotion.deploy",
                       "promotion.live"]


def test_rejection_needs_a_comment_and_ends_the_request(model: RegisteredModel, personas: dict[str, Any],
                                                        api_as: Any, tmp_path: Path) -> None:
    version = upload(model, personas["ds"], tmp_path)
    promotion = promotions.promotion_request(version=version, target="stage", reason="try", actor=personas["ds"])
    approver = api_as(personas["approver1"])
    assert_error_shape(approver.post(f"/api/v1/promotions/{promotion.uid}/reject", {}, format="json"), 400)
    response = approver.post(f"/api/v1/promotions/{promotion.uid}/reject", {"comment": "no reference data review"},
                             format="json")
    assert response.json()["status"] == "rejected"
    assert_error_shape(api_as(personas["approver2"]).post(f"/api/v1/promotions/{promotion.uid}/approve", {},
                                                          format="json"), 403)
    # A new request may follow a rejected one.
    again = promotions.promotion_request(version=version, target="stage", reason="reviewed", actor=personas["ds"])
    assert again.status == "pending"
    with pytest.raises(Exception, match="already has an open request"):
        promotions.promotion_request(version=version, target="stage", reason="twice", actor=personas["ds"])


def test_roles_without_the_capability_cannot_request_or_approve(
        model: RegisteredModel, personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    version = upload(model, personas["ds"], tmp_path)
    for who in ("viewer", "compliance", "approver1"):
        assert_error_shape(api_as(personas[who]).post(f"/api/v1/models/churn/versions/{version.number}/promote",
                                                      {"target": "stage", "reason": "x"}, format="json"), 403)
    assert_error_shape(api_as(personas["outsider"]).post(f"/api/v1/models/churn/versions/{version.number}/promote",
                                                         {"target": "stage", "reason": "x"}, format="json"), 404)
    promotion = promotions.promotion_request(version=version, target="stage", reason="x", actor=personas["ds"])
    for who in ("viewer", "compliance"):
        assert_error_shape(api_as(personas[who]).post(f"/api/v1/promotions/{promotion.uid}/approve", {},
                                                      format="json"), 403)
    assert_error_shape(api_as(personas["outsider"]).get(f"/api/v1/promotions/{promotion.uid}/"), 404)
    assert api_as(personas["viewer"]).get(f"/api/v1/promotions/{promotion.uid}/").status_code == 200
    queue = api_as(personas["approver1"]).get("/api/v1/promotions/?status=pending").json()
    assert [p["id"] for p in queue["results"]] == [str(promotion.uid)]
    assert api_as(personas["outsider"]).get("/api/v1/promotions/?status=pending").json()["results"] == []
    assert_error_shape(api_as(personas["approver1"]).get("/api/v1/promotions/?status=bogus"), 400)


def test_bad_requests_get_clear_4xx(model: RegisteredModel, personas: dict[str, Any], api_as: Any,
                                    tmp_path: Path) -> None:
    version = upload(model, personas["ds"], tmp_path)
    ds = api_as(personas["ds"])
    url = f"/api/v1/models/churn/versions/{version.number}/promote"
    assert_error_shape(ds.post(url, {"target": "qa", "reason": "x"}, format="json"), 400)
    assert_error_shape(ds.post(url, {"target": "stage"}, format="json"), 400)
    assert_error_shape(ds.post(url, "{not json", content_type="application/json"), 400)
    assert_error_shape(ds.get("/api/v1/models/churn/environments/qa/history"), 400)
    assert_error_shape(ds.get("/api/v1/models/churn/environments/dev/history?at=yesterday"), 400)
    assert_error_shape(ds.get("/api/v1/models/churn/environments/dev/history?at=2026-03-03T14:05:00"), 400)
    assert_error_shape(ds.get("/api/v1/promotions/00000000-0000-0000-0000-000000000000/"), 404)
    assert not PromotionRequest.objects.exists()


# --- Gates --------------------------------------------------------------------------------------------------------

def test_gates_block_an_incompatible_signature_unless_overridden_with_a_reason(
        model: RegisteredModel, personas: dict[str, Any], tmp_path: Path) -> None:
    v1 = upload(model, personas["ds"], tmp_path)
    promote_live(v1, "stage", personas)
    narrow = upload(model, personas["ds"], tmp_path, drop_last_column=True)
    promotion = promotions.promotion_request(version=narrow, target="stage", reason="fewer inputs",
                                             actor=personas["ds"])
    gate = next(g for g in promotion.gates if g["name"] == "signature")
    assert gate["blocks"] and "worst fractal dimension removed" in gate["detail"]
    with pytest.raises(Exception) as refused:
        promotions.promotion_decide(promotion=promotion, actor=personas["approver1"], approve=True)
    assert "Signature compatible" in str(refused.value)
    promotion.refresh_from_db()
    assert promotion.status == "pending" and not promotion.approvals.exists()
    promotions.promotion_cancel(promotion=promotion, actor=personas["ds"])

    overridden = promotions.promotion_request(version=narrow, target="stage", reason="fewer inputs",
                                              override_reason="Clients stopped sending that feature in March.",
                                              actor=personas["ds"])
    gate = next(g for g in overridden.gates if g["name"] == "signature")
    assert gate["overridden"] and not gate["blocks"]
    event = AuditEvent.objects.get(action="promotion.gate_override")
    assert event.after["reason"] == "Clients stopped sending that feature in March."
    assert run_deployment(approve_all(overridden, [personas["approver1"]])).status == "live"


def test_gates_block_a_worse_model_and_respect_the_tolerance(model: RegisteredModel, personas: dict[str, Any],
                                                              tmp_path: Path) -> None:
    v1 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.95, "log_loss": 0.20})
    promote_live(v1, "stage", personas)
    worse = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.90, "log_loss": 0.20})
    promotion = promotions.promotion_request(version=worse, target="stage", reason="cheaper", actor=personas["ds"])
    gate = next(g for g in promotion.gates if g["name"] == "metrics")
    assert gate["blocks"] and "auc" in gate["detail"]
    with pytest.raises(Exception, match="Metrics vs champion"):
        promotions.promotion_decide(promotion=promotion, actor=personas["approver1"], approve=True)
    # Lower is better for a loss: a higher loss is worse too.
    lossy = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.95, "log_loss": 0.30})
    gates = promotions.gates_evaluate(lossy, "stage")
    assert next(g for g in gates if g.name == "metrics").blocks
    # Within the tolerance passes.
    close = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.945, "log_loss": 0.205})
    assert not next(g for g in promotions.gates_evaluate(close, "stage") if g.name == "metrics").blocks
    PromotionPolicy.objects.create(environment="stage", model=model, approvals_required=1, metric_tolerance=0.1)
    assert not next(g for g in promotions.gates_evaluate(worse, "stage") if g.name == "metrics").blocks


def test_gates_are_checked_again_when_the_deployment_starts(model: RegisteredModel, personas: dict[str, Any],
                                                            tmp_path: Path) -> None:
    v1 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.90})
    v2 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.93})
    promotion = approve_all(promotions.promotion_request(version=v2, target="stage", reason="better",
                                                         actor=personas["ds"]), [personas["approver1"]])
    # Before its deployment runs, a better champion reaches stage.
    better = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.99})
    promote_live(better, "stage", personas)
    assert v1.pk
    result = deployments.deployment_run(deployment_id=promotion.deployment_id)
    assert result is not None and result.status == "failed" and "Metrics vs champion" in result.error
    promotion.refresh_from_db()
    assert promotion.status == "failed"
    assert promotions.champion_version(model, "stage") == better


def test_promotion_pages_show_gates_diffs_and_decisions(model: RegisteredModel, personas: dict[str, Any],
                                                        tmp_path: Path) -> None:
    v1 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.95})
    promote_live(v1, "stage", personas)
    v2 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.97})
    promotion = promotions.promotion_request(version=v2, target="stage", reason="<b>better</b>",
                                             actor=personas["ds"])
    client = Client()
    client.force_login(personas["approver1"])
    queue = client.get("/promotions/")
    assert queue.status_code == 200 and f"/promotions/{promotion.uid}/".encode() in queue.content
    page = client.get(f"/promotions/{promotion.uid}/")
    content = page.content.decode()
    assert 'data-testid="gates"' in content and 'data-testid="metric-diff"' in content
    assert "&lt;b&gt;better&lt;/b&gt;" in content and "<b>better</b>" not in content
    assert 'data-gate="metrics"' in content and "0.0200" in content
    assert 'name="password"' not in content, "stage approvals do not ask for a password"
    response = client.post(f"/promotions/{promotion.uid}/decide", {"decision": "approve", "comment": "fine"},
                           follow=True)
    assert b"deployment has started" in response.content
    assert b'id="deployment"' in response.content
    promotion.refresh_from_db()
    assert promotion.status == "deploying"
    viewer = Client()
    viewer.force_login(personas["viewer"])
    assert viewer.post(f"/promotions/{promotion.uid}/decide", {"decision": "approve"}).status_code == 302
    assert promotion.approvals.count() == 1
    outsider = Client()
    outsider.force_login(personas["outsider"])
    assert outsider.get(f"/promotions/{promotion.uid}/").status_code == 404


# --- Rollback and history -----------------------------------------------------------------------------------------

def test_the_timeline_answers_what_served_at_t_across_three_promotions_and_a_rollback(
        model: RegisteredModel, personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    versions = [upload(model, personas["ds"], tmp_path, metrics={"auc": 0.90 + i / 100}) for i in range(3)]
    moments: list[tuple[dt.datetime, int | None]] = [(timezone.now(), None)]
    for version in versions:
        time.sleep(0.05)
        promote_live(version, "stage", personas)
        time.sleep(0.05)
        moments.append((timezone.now(), version.number))
    deployment = promotions.environment_rollback(model=model, environment="stage", reason="v3 misbehaves",
                                                 actor=personas["approver1"])
    assert deployment.version == versions[1]
    assert deployments.deployment_run(deployment_id=deployment.pk).status == "live"  # type: ignore[union-attr]
    time.sleep(0.05)
    moments.append((timezone.now(), versions[1].number))

    client = api_as(personas["viewer"])
    for at, expected in moments:
        body = client.get("/api/v1/models/churn/environments/stage/history", {"at": at.isoformat()}).json()
        served = body["serving"]["version"] if body["serving"] else None
        assert served == expected, (at, body)
    serving = client.get("/api/v1/models/churn/environments/stage/history",
                         {"at": moments[2][0].isoformat()}).json()["serving"]
    assert serving["requested_by"] == "dana" and serving["approved_by"] == ["alex"]
    assert serving["reason"] == "ship to stage" and serving["how"] == "promotion"
    history = client.get("/api/v1/models/churn/environments/stage/history").json()["history"]
    assert [(h["version"], h["how"]) for h in history] == [(2, "rollback"), (3, "promotion"), (2, "promotion"),
                                                           (1, "promotion")]
    assert history[0]["to"] is None and all(h["to"] for h in history[1:])
    assert "v3 misbehaves" in history[0]["reason"] and history[0]["requested_by"] == "alex"

    browser = Client()
    browser.force_login(personas["viewer"])
    page = browser.get("/models/churn/environments/stage/", {"at": moments[1][0].isoformat()})
    assert b'data-testid="timeline"' in page.content
    assert b"<strong>v1</strong> served stage" in page.content
    assert b'data-testid="rollback-form"' not in page.content, "viewers cannot roll back"


def test_rollback_to_a_chosen_version_and_its_refusals(model: RegisteredModel, personas: dict[str, Any],
                                                       api_as: Any, tmp_path: Path) -> None:
    v1, v2, v3 = (upload(model, personas["ds"], tmp_path) for _ in range(3))
    ds = api_as(personas["ds"])
    url = "/api/v1/models/churn/environments/dev/rollback"
    assert_error_shape(ds.post(url, {"reason": "x"}, format="json"), 400)  # nothing serves dev
    for v in (v1, v2, v3):
        deploy_now(v, personas["ds"])
    assert_error_shape(ds.post(url, {}, format="json"), 400)  # no reason
    assert_error_shape(ds.post(url, {"reason": "x", "to_version": 3}, format="json"), 400)  # serves now
    assert_error_shape(ds.post(url, {"reason": "x", "to_version": 9}, format="json"), 400)
    assert_error_shape(api_as(personas["viewer"]).post(url, {"reason": "x"}, format="json"), 403)
    assert_error_shape(ds.post("/api/v1/models/churn/environments/prod/rollback", {"reason": "x"}, format="json"),
                       403)
    response = ds.post(url, {"reason": "back to the first", "to_version": 1}, format="json")
    assert response.status_code == 202 and response.json()["version"] == 1
    deployments.deployment_run(deployment_id=Deployment.objects.get(uid=response.json()["id"]).pk)
    assert promotions.champion_version(model, "dev") == v1
    event = AuditEvent.objects.get(action="environment.rollback")
    assert event.before == {"version": 3} and event.after["version"] == 1


# --- Concurrency (real PostgreSQL row locks) ------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_two_approvals_racing_start_exactly_one_deployment(personas: dict[str, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from portal import tasks as portal_tasks
    from registry.deployments import tasks as registry_tasks

    queued: list[int] = []
    monkeypatch.setattr(registry_tasks.deployment_run_task, "delay", lambda pk, **kw: queued.append(pk))
    monkeypatch.setattr(portal_tasks.send_email_task, "delay", lambda *a, **kw: None)
    model = services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    version = upload(model, personas["ds"], tmp_path)
    results: dict[str, Any] = {}
    for target, required in (("stage", 1), ("stage", 2)):
        PromotionPolicy.objects.update_or_create(environment="stage", model=model,
                                                 defaults={"approvals_required": required})
        PromotionRequest.objects.filter(status="pending").update(status="cancelled")
        promotion = promotions.promotion_request(version=version, target=target, reason="race",
                                                 actor=personas["ds"])
        barrier = threading.Barrier(2)

        def approve(who: str, promotion: PromotionRequest = promotion,
                    barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                promotions.promotion_decide(promotion=promotion, actor=personas[who], approve=True)
                results[who] = "ok"
            except Exception as exc:  # the loser's refusal is what we look at
                results[who] = f"{type(exc).__name__}: {exc}"
            finally:
                connection.close()

        threads = [threading.Thread(target=approve, args=(w,)) for w in ("approver1", "approver2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        promotion.refresh_from_db()
        deployments_started = Deployment.objects.filter(environment="stage", version=version,
                                                        promotion=promotion).count()
        assert deployments_started == 1, (required, results)
        assert promotion.status == "deploying"
        if required == 1:
            outcomes = sorted(results.values())
            assert outcomes[1] == "ok" and outcomes[0].startswith("PermissionDenied"), results
        else:
            assert set(results.values()) == {"ok"} and promotion.approvals.count() == 2
        Deployment.objects.filter(pk=promotion.deployment_id).update(status="failed")
        PromotionRequest.objects.filter(pk=promotion.pk).update(status="failed")
    assert len(queued) == 2


# --- Notifications ------------------------------------------------------------------------------------------------

def test_emails_go_to_approvers_on_request_and_to_the_requester_on_decision(
        model: RegisteredModel, personas: dict[str, Any], tmp_path: Path, settings: Any,
        monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any) -> None:
    from portal import tasks as portal_tasks

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    monkeypatch.setattr(portal_tasks.send_email_task, "delay", lambda *a: portal_tasks.send_email_task(*a))
    version = upload(model, personas["ds"], tmp_path)
    with django_capture_on_commit_callbacks(execute=True):
        promotion = promotions.promotion_request(version=version, target="stage", reason="ready",
                                                 actor=personas["ds"])
    assert len(mail.outbox) == 1
    assert sorted(mail.outbox[0].to) == ["ada@example.invalid", "alex@example.invalid", "blair@example.invalid"]
    assert f"/promotions/{promotion.uid}/" in mail.outbox[0].body
    with django_capture_on_commit_callbacks(execute=True):
        promotions.promotion_decide(promotion=promotion, actor=personas["approver1"], approve=False,
                                    comment="needs a fairness review")
    assert mail.outbox[1].to == ["dana@example.invalid"]
    assert "rejected" in mail.outbox[1].subject and "needs a fairness review" in mail.outbox[1].body


@pytest.mark.parametrize("persona,expected", [
    (None, 302), ("outsider", 404), ("viewer", 200), ("ds", 200), ("approver1", 200), ("compliance", 200),
    ("admin", 200)])
def test_promotion_pages_per_role(model: RegisteredModel, personas: dict[str, Any], tmp_path: Path,
                                  persona: str | None, expected: int) -> None:
    version = upload(model, personas["ds"], tmp_path)
    other = upload(model, personas["ds"], tmp_path)
    promotion = promotions.promotion_request(version=version, target="stage", reason="x", actor=personas["ds"])
    client = Client()
    if persona:
        client.force_login(personas[persona])
    for path in (f"/promotions/{promotion.uid}/", "/models/churn/environments/stage/"):
        assert client.get(path).status_code == expected, path
    assert client.get("/promotions/").status_code == (302 if persona is None else 200)
    # Writes: only an approver of the team decides; only data scientists (and admins) request.
    decided = client.post(f"/promotions/{promotion.uid}/decide", {"decision": "reject", "comment": "no"})
    promotion.refresh_from_db()
    assert (promotion.status == "rejected") == (persona in ("approver1", "admin")), (persona, decided.status_code)
    requested = client.post(f"/models/churn/versions/{other.number}/promote", {"target": "stage", "reason": "y"})
    opened = PromotionRequest.objects.filter(version=other).count()
    assert opened == (1 if persona in ("ds", "admin") else 0), (persona, requested.status_code)
    rolled = client.post("/models/churn/environments/stage/rollback", {"reason": "z"})
    assert not Deployment.objects.filter(purpose="rollback").exists(), rolled.status_code


def test_a_models_audit_timeline_gathers_its_versions_deployments_and_promotions(
        model: RegisteredModel, personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    other = services.model_register(name="churn-eu", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    version = upload(model, personas["ds"], tmp_path)
    promote_live(version, "stage", personas)
    assert other.pk
    events = api_as(personas["compliance"]).get("/api/v1/audit/events", {"model": "churn", "page_size": 200}).json()
    actions = {e["action"] for e in events["results"]}
    assert {"model.register", "version.upload", "promotion.request", "promotion.approve", "deployment.create",
            "deployment.live", "promotion.live"} <= actions
    assert all("churn-eu" not in (e["target"]["repr"] if isinstance(e.get("target"), dict) else json.dumps(e))
               for e in events["results"])


def test_wrong_prod_passwords_count_towards_the_sign_in_lockout(
        model: RegisteredModel, personas: dict[str, Any], api_as: Any, tmp_path: Path, settings: Any) -> None:
    settings.AXES_FAILURE_LIMIT = 3
    version = upload(model, personas["ds"], tmp_path)
    promote_live(version, "stage", personas)
    promotion = promotions.promotion_request(version=version, target="prod", reason="go", actor=personas["ds"])
    approver = api_as(personas["approver1"])
    url = f"/api/v1/promotions/{promotion.uid}/approve"
    for guess in ("guess-one-1", "guess-two-2"):
        assert_error_shape(approver.post(url, {"password": guess}, format="json"), 403)
    assert_error_shape(approver.post(url, {"password": "guess-three-3"}, format="json"), 429, "locked_out")
    assert_error_shape(approver.post(url, {"password": PASSWORD}, format="json"), 429, "locked_out")
    assert not promotion.approvals.exists()
    assert AuditEvent.objects.filter(action="auth.reauth_failed").count() >= 3
    # The same lockout keeps the browser sign-in shut.
    assert Client().post("/login/", {"username": "alex", "password": PASSWORD}).status_code == 429


@pytest.mark.parametrize("persona,history,cancel,deliveries", [
    (None, 401, 401, 401), ("outsider", 404, 404, 404), ("viewer", 200, 403, 403), ("ds", 200, 200, 403),
    ("approver1", 200, 403, 403), ("compliance", 200, 403, 403), ("admin", 200, 200, 200)])
def test_history_cancel_and_webhook_log_per_role(model: RegisteredModel, personas: dict[str, Any], api_as: Any,
                                                 tmp_path: Path, persona: str | None, history: int, cancel: int,
                                                 deliveries: int) -> None:
    from portal.models import TeamWebhook

    version = upload(model, personas["ds"], tmp_path)
    promotion = promotions.promotion_request(version=version, target="stage", reason="x", actor=personas["ds"])
    if persona == "admin":  # an admin cancels someone else's request; a data scientist only their own
        PromotionRequest.objects.filter(pk=promotion.pk).update(requested_by=personas["approver2"])
    hook = TeamWebhook.objects.create(team=model.team, url="https://hooks.example.com/x", secret="s" * 20)
    client = api_as(personas[persona] if persona else None)
    response = client.get("/api/v1/models/churn/environments/stage/history")
    assert response.status_code == history
    response = client.post(f"/api/v1/promotions/{promotion.uid}/cancel")
    assert response.status_code == cancel, response.content
    promotion.refresh_from_db()
    assert (promotion.status == "cancelled") == (cancel == 200)
    response = client.get(f"/api/v1/teams/acme/webhooks/{hook.pk}/deliveries")
    assert response.status_code == deliveries
    if history != 200:
        assert_error_shape(client.get("/api/v1/models/churn/environments/stage/history"), history)
    assert_error_shape(api_as(personas["ds"]).get(
        "/api/v1/models/churn/environments/stage/history", {"at": "2026-13-45T00:00:00Z"}), 400)


# --- Live evidence and the signature panel ------------------------------------------------------------------------

def _log(model: str, environment: str, version: int, n: int, *, errors: int = 0, latency_ms: float = 2.0) -> None:
    """``n`` one-row predictions written the way the flusher writes them, a few minutes ago, then rolled up."""
    import os

    from monitoring.flush import write_batches
    from monitoring.rollups import rollup_dirty

    X, _y = files._data()
    at = timezone.now() - dt.timedelta(minutes=3)
    write_batches([{"model": model, "environment": environment, "version": version, "role": "champion",
                    "ts": at.timestamp() + i * 0.001, "latency_ms": latency_ms, "request_id": "",
                    "error": "ValueError: bad row" if i < errors else "", "ids": [os.urandom(16).hex()],
                    "inputs": [X.iloc[i].tolist()], "outputs": [None if i < errors else 1], "subjects": None}
                   for i in range(n)])
    rollup_dirty()


def test_live_evidence_compares_the_candidate_where_it_served_with_the_champion_on_page_and_api(
        model: RegisteredModel, personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    import re

    v1 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.95})
    first = promotions.promotion_request(version=v1, target="stage", reason="first", actor=personas["ds"])
    page = Client()
    page.force_login(personas["approver1"])
    content = page.get(f"/promotions/{first.uid}/").content.decode()
    summary = re.search(r'data-testid="signature-summary"[^>]*>([^<]*)<', content)
    assert summary and summary.group(1) == "Nothing serves stage yet: all 30 inputs are new there.", content
    assert "unchanged" not in summary.group(1) and "<strong>added</strong>" not in content
    assert 'data-testid="evidence-empty"' in content
    run_deployment(approve_all(first, [personas["approver1"]]))

    v2 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.96}, c=0.5)
    deploy_now(v2, personas["ds"])
    _log("churn", "dev", v2.number, 200, errors=20, latency_ms=5.0)
    _log("churn", "stage", v1.number, 100, latency_ms=2.0)
    promotion = promotions.promotion_request(version=v2, target="stage", reason="dev looks fine",
                                             actor=personas["ds"])

    api = api_as(personas["approver1"]).get(f"/api/v1/promotions/{promotion.uid}/evidence?window=1h").json()
    assert [c["key"] for c in api["columns"]] == ["candidate-dev", "champion-stage"]
    assert api["champion_version"] == v1.number and api["window"] == "1h"
    by_metric = {r["metric"]: {c["column"]: c for c in r["cells"]} for r in api["rows"]}
    assert by_metric["predictions"]["candidate-dev"]["value"] == 200
    assert by_metric["predictions"]["champion-stage"]["value"] == 100
    assert by_metric["error_rate"]["candidate-dev"]["value"] == pytest.approx(0.1)
    assert by_metric["error_rate"]["candidate-dev"]["status"] == "warn", "10 % is above the 5 % limit"
    assert by_metric["error_rate"]["champion-stage"]["status"] == "pass"
    assert by_metric["p50"]["candidate-dev"]["status"] == "warn", "5 ms against the champion's 2 ms"
    assert by_metric["p99"]["candidate-dev"]["status"] == "pass"
    assert by_metric["accuracy"]["candidate-dev"]["status"] == "insufficient", "no ground truth yet"
    assert api["warnings"] >= 2

    content = page.get(f"/promotions/{promotion.uid}/?window=1h").content.decode()
    for row in api["rows"]:
        for cell in row["cells"]:
            shown = re.search(rf'<tr data-metric="{row["metric"]}">.*?<td data-column="{cell["column"]}" '
                              rf'data-status="([a-z]+)"><span data-testid="evidence-value">([^<]*)</span>',
                              content, re.S)
            assert shown and shown.groups() == (cell["status"], cell["display"]), (row["metric"], cell)
    summary = re.search(r'data-testid="signature-summary"[^>]*>([^<]*)<', content)
    assert summary and summary.group(1) == f"All 30 inputs unchanged from v{v1.number}."

    bad = api_as(personas["approver1"]).get(f"/api/v1/promotions/{promotion.uid}/evidence?window=2y")
    assert_error_shape(bad, 400)
    assert "1h, 24h, 7d" in bad.json()["error"]["message"] + str(bad.json()["error"]["details"])
    assert api_as(personas["outsider"]).get(f"/api/v1/promotions/{promotion.uid}/evidence").status_code == 404
    assert api_as(None).get(f"/api/v1/promotions/{promotion.uid}/evidence").status_code in (401, 403)
    assert api_as(personas["viewer"]).get(f"/api/v1/promotions/{promotion.uid}/evidence").status_code == 200


    # An approver who mistypes the prod password keeps the comment they wrote.
    to_prod = promotions.promotion_request(version=v1, target="prod", reason="go", actor=personas["ds"])
    response = page.post(f"/promotions/{to_prod.uid}/decide",
                         {"decision": "approve", "comment": "Checked the stage figures & <drift>.",
                          "password": "wrong"}, follow=True)
    content = response.content.decode()
    assert "password" in content.lower() and to_prod.approvals.count() == 0
    assert ">Checked the stage figures &amp; &lt;drift&gt;.</textarea>" in content
    assert "Checked the stage figures" not in page.get(f"/promotions/{to_prod.uid}/").content.decode(), \
        "kept once, for the page that follows the refusal"
