"""A blocked promotion request says so and asks nobody, and its approvers are notified (email, as on any request)
once its blocking gates clear; missing ground truth blocks Approve where the model's accuracy is judged ("too little
data" stands), on the page and through the API, for every role."""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.core import mail
from django.test import Client
from django.utils import timezone

from portal.models import AuditEvent, Team
from registry.models import ModelVersion, PromotionRequest, RegisteredModel
from registry.promotions import services as promotions
from registry.promotions.tasks import promotions_recheck_task
from registry.versions import services
from tests.conftest import PASSWORD, assert_error_shape
from tests.registry import files
from tests.registry.conftest import deploy_now
from tests.registry.promotions.test_promotions import upload


@pytest.fixture
def model(personas: dict[str, Any]) -> RegisteredModel:
    return services.model_register(name="breast-cancer", team=Team.objects.get(slug="acme"), actor=personas["ds"])


@pytest.fixture
def sent_mail(settings: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Email as the portal sends it (the Celery task, run at once), caught at the mail backend."""
    from portal import tasks as portal_tasks

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    monkeypatch.setattr(portal_tasks.send_email_task, "delay", lambda *a: portal_tasks.send_email_task(*a))
    mail.outbox = []
    return mail.outbox


def _log(version: ModelVersion, n: int, *, environment: str = "dev") -> list[str]:
    """``n`` live predictions of ``version`` (output 1) written as the flusher writes them, rolled up; their ids."""
    from monitoring.flush import write_batches
    from monitoring.rollups import rollup_dirty

    X, _y = files._data()
    at = timezone.now() - dt.timedelta(minutes=3)
    ids = [os.urandom(16).hex() for _ in range(n)]
    write_batches([{"model": version.model.name, "environment": environment, "version": version.number,
                    "role": "champion", "ts": at.timestamp() + i * 0.001, "latency_ms": 2.0, "request_id": "",
                    "error": "", "ids": [ids[i]], "inputs": [X.iloc[i].tolist()], "outputs": [1], "subjects": None}
                   for i in range(n)])
    rollup_dirty()
    return ids


def _feedback(api: Any, ids: list[str], actual: list[int]) -> None:
    """Ground truth through the real endpoint, then rolled up (beat does it every 30 s)."""
    from monitoring.rollups import rollup_dirty

    response = api.post("/api/v1/serve/breast-cancer/dev/feedback",
                        [{"prediction_id": i, "actual": a} for i, a in zip(ids, actual, strict=True)], format="json")
    assert response.status_code == 202 and response.json()["accepted"] == len(ids), response.content
    rollup_dirty()


def _page(user: Any, promotion: PromotionRequest) -> str:
    client = Client()
    client.force_login(user)
    response = client.get(f"/promotions/{promotion.uid}/")
    assert response.status_code == 200
    return response.content.decode()


def test_a_blocked_request_asks_nobody_and_its_approvers_are_notified_once_when_its_gate_clears(
        model: RegisteredModel, personas: dict[str, Any], api_as: Any, settings: Any, tmp_path: Path,
        sent_mail: list[Any], django_capture_on_commit_callbacks: Any) -> None:
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 20
    v1 = upload(model, personas["ds"], tmp_path)  # no recorded accuracy: only the traffic gate stands in the way
    deploy_now(v1, personas["ds"])
    with django_capture_on_commit_callbacks(execute=True):
        response = api_as(personas["ds"]).post(f"/api/v1/models/breast-cancer/versions/{v1.number}/promote",
                                               {"target": "stage", "reason": "dev looks right"}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["blocked"] is True and body["approvers_notified_at"] is None
    assert [g["name"] for g in body["gates"] if g["blocks"]] == ["traffic"]
    assert sent_mail == [], "nobody is asked to approve a blocked request"
    promotion = PromotionRequest.objects.get(uid=body["id"])
    content = _page(personas["approver1"], promotion)
    assert 'data-testid="blocked"' in content
    assert "Approvers have not been notified; they will be when every gate passes." in content

    # Still blocked: the beat task finds nothing to tell.
    _log(v1, 19)
    with django_capture_on_commit_callbacks(execute=True):
        assert promotions_recheck_task() == []
    assert sent_mail == [] and not AuditEvent.objects.filter(action="promotion.unblocked").exists()

    _log(v1, 1)  # the 20th live prediction in dev: the gate clears
    with django_capture_on_commit_callbacks(execute=True):
        assert promotions_recheck_task() == [str(promotion.uid)]
    assert len(sent_mail) == 1
    assert sent_mail[0].subject == f"Approval needed: breast-cancer v{v1.number} to stage"
    assert sorted(sent_mail[0].to) == ["ada@example.invalid", "alex@example.invalid", "blair@example.invalid"]
    assert f"/promotions/{promotion.uid}/" in sent_mail[0].body
    event = AuditEvent.objects.get(action="promotion.unblocked")
    assert event.target_id == str(promotion.uid)
    assert event.before == {"blocking_gates": ["traffic"]}
    assert event.after["blocking_gates"] == [] and len(event.after["approvers_notified"]) == 3
    promotion.refresh_from_db()
    assert promotion.approvers_notified_at is not None
    assert not any(g["blocks"] for g in promotion.gates), "the gates recorded are the ones that cleared"

    # Exactly once: a second check tells nobody again.
    with django_capture_on_commit_callbacks(execute=True):
        assert promotions_recheck_task() == []
    assert len(sent_mail) == 1 and AuditEvent.objects.filter(action="promotion.unblocked").count() == 1
    detail = api_as(personas["approver1"]).get(f"/api/v1/promotions/{promotion.uid}/").json()
    assert detail["blocked"] is False and detail["review"]["approvable"] is True
    content = _page(personas["approver1"], promotion)
    assert 'data-testid="blocked"' not in content and "have not been notified" not in content
    approved = api_as(personas["approver1"]).post(f"/api/v1/promotions/{promotion.uid}/approve",
                                                  {"comment": "traffic is in"}, format="json")
    assert approved.status_code == 200, approved.content


def test_the_recheck_runs_on_beat_as_a_registered_task() -> None:
    from config.celery import app

    entry = next(e for e in django_settings.CELERY_BEAT_SCHEDULE.values()
                 if e["task"] == "registry.tasks.promotions_recheck")
    assert entry["schedule"] <= dt.timedelta(minutes=1)
    app.loader.import_default_modules()
    assert "registry.tasks.promotions_recheck" in app.tasks


def test_a_request_that_was_never_blocked_is_not_announced_twice(
        model: RegisteredModel, personas: dict[str, Any], tmp_path: Path, settings: Any, sent_mail: list[Any],
        django_capture_on_commit_callbacks: Any) -> None:
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 0
    v1 = upload(model, personas["ds"], tmp_path)
    with django_capture_on_commit_callbacks(execute=True):
        promotion = promotions.promotion_request(version=v1, target="stage", reason="ready", actor=personas["ds"])
    assert promotion.approvers_notified_at is not None and len(sent_mail) == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert promotions.promotions_recheck_blocked() == []
    assert len(sent_mail) == 1


# --- Ground truth -------------------------------------------------------------------------------------------------

@pytest.fixture
def awaiting_truth(model: RegisteredModel, personas: dict[str, Any], settings: Any,
                   tmp_path: Path) -> tuple[PromotionRequest, list[str]]:
    """v1 (recorded accuracy 0.95, so its floor is 0.90) served dev and answered 60 live predictions there, none
    with ground truth yet; its promotion to stage is requested."""
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 20
    v1 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.95})
    deploy_now(v1, personas["ds"])
    ids = _log(v1, 60)
    promotion = promotions.promotion_request(version=v1, target="stage", reason="ready for stage",
                                             actor=personas["ds"])
    return promotion, ids


TOO_LITTLE = ("Too little data: 0 of v1's live predictions in dev have ground truth; 50 are needed to judge its "
              "accuracy against the floor of 0.900. Send ground truth to the feedback endpoint.")


def test_missing_ground_truth_blocks_approve_on_the_page_with_the_reason(
        awaiting_truth: tuple[PromotionRequest, list[str]], personas: dict[str, Any]) -> None:
    promotion, _ids = awaiting_truth
    gates = {g["name"]: g for g in promotion.gates}
    assert gates["traffic"]["ok"], "60 live predictions answered: traffic alone would let it through"
    assert gates["ground_truth"]["blocks"] and gates["ground_truth"]["detail"] == TOO_LITTLE
    assert gates["ground_truth"]["label"] == "Accuracy on ground truth in dev"
    for persona in ("approver1", "approver2", "admin"):
        content = _page(personas[persona], promotion)
        assert re.search(r'<button type="submit" name="decision" value="approve" class="primary" disabled '
                         r'aria-describedby="approve-blocked">', content), persona
        blocked = content[content.index('data-testid="approve-blocked"'):]
        assert "Accuracy on ground truth in dev" in blocked and "Too little data: 0 of v1" in blocked, persona
    # Those who may not decide at all (the requester, roles without approval) see no Approve button.
    for persona in ("ds", "compliance", "viewer"):
        assert 'name="decision" value="approve"' not in _page(personas[persona], promotion), persona


@pytest.mark.parametrize("persona,status,says", [
    ("approver1", 400, "Too little data: 0 of v1"),
    ("approver2", 400, "Too little data: 0 of v1"),
    ("admin", 400, "Too little data: 0 of v1"),
    ("ds", 403, "Your role does not allow approving promotions."),
    ("compliance", 403, "approv"),
    ("viewer", 403, "approv"),
    ("outsider", 404, ""),
    (None, 401, ""),
])
def test_the_api_refuses_approval_without_ground_truth_for_every_role(
        awaiting_truth: tuple[PromotionRequest, list[str]], personas: dict[str, Any], api_as: Any,
        persona: str | None, status: int, says: str) -> None:
    promotion, _ids = awaiting_truth
    response = api_as(personas[persona] if persona else None).post(
        f"/api/v1/promotions/{promotion.uid}/approve", {"comment": "ok", "password": PASSWORD}, format="json")
    assert_error_shape(response, status)
    assert says in response.content.decode()
    assert promotion.approvals.count() == 0
    promotion.refresh_from_db()
    assert promotion.status == "pending"


def test_the_service_refuses_too_and_ground_truth_then_a_good_accuracy_clears_the_gate(
        awaiting_truth: tuple[PromotionRequest, list[str]], personas: dict[str, Any], api_as: Any,
        sent_mail: list[Any], django_capture_on_commit_callbacks: Any) -> None:
    from django.core.exceptions import ValidationError

    promotion, ids = awaiting_truth
    with pytest.raises(ValidationError, match="Too little data: 0 of v1"):
        promotions.promotion_decide(promotion=promotion, actor=personas["approver1"], approve=True, comment="ok")
    scorer = api_as(personas["ds"])
    _feedback(scorer, ids[:30], [1] * 30)
    gate = next(g for g in promotions.gates_evaluate(promotion.version, "stage") if g.name == "ground_truth")
    assert gate.blocks and gate.detail.startswith("Too little data: 30 of v1's live predictions in dev")
    assert gate.rows == [{"environment": "dev", "labelled": 30, "minimum": 50, "accuracy": 1.0,
                          "floor": pytest.approx(0.9)}]

    # Enough labels, but a third of them say the model was wrong: below the floor, still blocked.
    _feedback(scorer, ids[30:], [0] * 20 + [1] * 10)
    gate = next(g for g in promotions.gates_evaluate(promotion.version, "stage") if g.name == "ground_truth")
    assert gate.blocks and gate.detail == ("Accuracy 0.667 on 60 labelled predictions in dev is below the floor of "
                                           "0.900.")
    with django_capture_on_commit_callbacks(execute=True):
        assert promotions.promotions_recheck_blocked() == []
    assert sent_mail == []

    # Corrected labels (a later value replaces the earlier one): accuracy 1.0, the gate passes, approvers are told.
    _feedback(scorer, ids[30:50], [1] * 20)
    with django_capture_on_commit_callbacks(execute=True):
        assert promotions.promotions_recheck_blocked() == [str(promotion.uid)]
    assert len(sent_mail) == 1 and sent_mail[0].subject.startswith("Approval needed")
    promotion.refresh_from_db()
    gate = next(g for g in promotion.gates if g["name"] == "ground_truth")
    assert gate["ok"] and gate["detail"] == "Accuracy 1.000 on 60 labelled predictions in dev (floor 0.900)."
    decided = promotions.promotion_decide(promotion=promotion, actor=personas["approver1"], approve=True,
                                          comment="labels are in")
    assert decided.status == "deploying"


def test_no_accuracy_gate_where_no_accuracy_is_judged(
        model: RegisteredModel, personas: dict[str, Any], settings: Any, tmp_path: Path) -> None:
    """No floor set and no recorded accuracy, or the evidence requirement off: ground truth is not asked for."""
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 20
    v1 = upload(model, personas["ds"], tmp_path)
    deploy_now(v1, personas["ds"])
    _log(v1, 20)
    assert "ground_truth" not in {g.name for g in promotions.gates_evaluate(v1, "stage")}
    v2 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.95}, c=0.5)
    assert "ground_truth" in {g.name for g in promotions.gates_evaluate(v2, "stage")}
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 0
    assert "ground_truth" not in {g.name for g in promotions.gates_evaluate(v2, "stage")}
