"""What an approver decides on: the candidate against the version it would replace (dev counts for stage), the
request's reason held against the figures, a minimum of real traffic before "served" counts, and Approve refused
(on the page and on the server) while anything blocks; a blocked request tells nobody to approve it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from django.test import Client

from portal.models import Team
from registry.models import RegisteredModel
from registry.promotions import services as promotions
from registry.promotions.reasons import reason_check
from registry.versions import services
from tests.conftest import assert_error_shape
from tests.registry.conftest import deploy_now
from tests.registry.promotions.test_promotions import _log, approve_all, run_deployment, upload


@pytest.fixture
def model(personas: dict[str, Any]) -> RegisteredModel:
    return services.model_register(name="breast-cancer", team=Team.objects.get(slug="acme"), actor=personas["ds"])


def _rows(**pairs: tuple[float, float]) -> list[dict[str, Any]]:
    return [{"name": name, "champion": old, "candidate": new, "delta": new - old,
             "direction": "lower is better" if name in ("loss", "rmse") else "higher is better"}
            for name, (old, new) in pairs.items()]


def test_the_reason_is_held_against_the_direction_of_each_figure() -> None:
    lower = _rows(accuracy=(0.979, 0.965))
    check = reason_check("Scores higher than v1 on the holdout.", lower, baseline="v1 (serves dev)")
    assert len(check["contradictions"]) == 1
    assert "0.965 vs 0.979" in check["contradictions"][0] and "v1 (serves dev)" in check["contradictions"][0]
    named = reason_check("Accuracy is up two points", lower, baseline="v1")
    assert named["contradictions"] == [
        "The reason says accuracy went up (“up”), but it is 0.965 against 0.979 for v1 (Δ -0.014)."]
    # Agreement, lower-is-better metrics, negations and claims with nothing to compare are not contradictions.
    assert reason_check("Scores higher", _rows(accuracy=(0.9, 0.95)), baseline="v1")["contradictions"] == []
    assert reason_check("Lower loss, better model", _rows(loss=(0.3, 0.2)), baseline="v1")["contradictions"] == []
    assert reason_check("Loss is higher", _rows(loss=(0.3, 0.2)), baseline="v1")["contradictions"] != []
    assert reason_check("Not better, just smaller", lower, baseline="v1")["contradictions"] == []
    assert reason_check("Scores higher", [], baseline="")["claims"] == []
    mixed = reason_check("It scores higher", _rows(accuracy=(0.97, 0.96), auc=(0.90, 0.95)), baseline="v1")
    assert mixed["contradictions"] == [] and mixed["claims"][0]["agrees"]


def test_a_stage_candidate_is_compared_with_dev_and_refused_while_it_has_no_traffic(
        model: RegisteredModel, personas: dict[str, Any], api_as: Any, settings: Any, tmp_path: Path) -> None:
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 50
    v1 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.979})
    deploy_now(v1, personas["ds"])
    v2 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.965}, c=0.5)
    mail.outbox.clear()
    promotion = promotions.promotion_request(version=v2, target="stage", reason="v2 scores higher.",
                                             actor=personas["ds"])
    gates = {g["name"]: g for g in promotion.gates}
    assert gates["traffic"]["blocks"] and "never served dev" in gates["traffic"]["detail"]
    assert gates["metrics"]["blocks"] and "v1 (serves dev)" in gates["metrics"]["detail"]
    assert mail.outbox == [], "nobody is asked to approve a blocked request"

    detail = api_as(personas["approver1"]).get(f"/api/v1/promotions/{promotion.uid}/").json()
    review = detail["review"]
    assert review["baseline"] == {"version": v1.number, "environment": "dev", "why": "serves dev",
                                  "label": f"v{v1.number} (serves dev)"}
    assert review["approvable"] is False and len(review["blockers"]) == 3  # traffic, ground truth, metrics
    assert "0.965 vs 0.979" in review["reason_check"]["contradictions"][0]
    refused = api_as(personas["approver1"]).post(f"/api/v1/promotions/{promotion.uid}/approve", {"comment": "ok"},
                                                 format="json")
    assert_error_shape(refused, 400)
    assert promotion.approvals.count() == 0

    page = Client()
    page.force_login(personas["approver1"])
    content = page.get(f"/promotions/{promotion.uid}/").content.decode()
    assert re.search(r'<button type="submit" name="decision" value="approve" class="primary" disabled '
                     r'aria-describedby="approve-blocked">', content)
    assert 'data-testid="approve-blocked"' in content and "Enough live traffic in dev" in content
    assert 'data-testid="reason-contradiction"' in content and "Approvers have not been notified" in content
    # The page's evidence sets v2 (dev: nothing yet) beside v1 in dev, where v1 serves.
    evidence = api_as(personas["approver1"]).get(f"/api/v1/promotions/{promotion.uid}/evidence").json()
    assert [c["key"] for c in evidence["columns"]] == ["champion-dev"]
    assert evidence["columns"][0]["label"] == f"v{v1.number} (it replaces) in dev"

    # Posting the form anyway is refused by the server too.
    response = page.post(f"/promotions/{promotion.uid}/decide", {"decision": "approve", "comment": "x"}, follow=True)
    assert "Enough live traffic in dev" in response.content.decode() and promotion.approvals.count() == 0


def test_served_in_stage_needs_the_minimum_of_real_predictions(
        model: RegisteredModel, personas: dict[str, Any], settings: Any, tmp_path: Path) -> None:
    v1 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.97})
    run_deployment(approve_all(promotions.promotion_request(version=v1, target="stage", reason="first",
                                                            actor=personas["ds"]), [personas["approver1"]]))
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 30
    to_prod = promotions.promotion_request(version=v1, target="prod", reason="stage looks fine",
                                           actor=personas["ds"])
    gates = {g["name"]: g for g in to_prod.gates}
    assert gates["path"]["ok"], "it did serve in stage"
    assert gates["traffic"]["blocks"]
    assert gates["traffic"]["detail"] == ("Too little data: v1 answered 0 live predictions in stage; 30 are needed "
                                          "before prod.")
    _log("breast-cancer", "stage", v1.number, 20)
    assert next(g for g in promotions.gates_evaluate(v1, "prod") if g.name == "traffic").rows == [{"environment": "stage", "predictions": 20,
                                                              "minimum": 30}]
    with pytest.raises(Exception, match="Enough live traffic in stage"):
        approve_all(to_prod, [personas["approver1"]])
    _log("breast-cancer", "stage", v1.number, 10)
    traffic = next(g for g in promotions.gates_evaluate(v1, "prod") if g.name == "traffic")
    assert traffic.ok and traffic.detail == "It answered 30 live predictions in stage (at least 30 needed)."
    # Predictions of another version or environment do not count.
    _log("breast-cancer", "dev", v1.number, 5)
    assert promotions.live_predictions(model, "stage", v1.number) == 30
    assert promotions.live_predictions(model, "stage", v1.number + 1) == 0


def test_the_version_page_says_a_blocked_request_is_blocked_not_that_approvers_were_told(
        model: RegisteredModel, personas: dict[str, Any], settings: Any, tmp_path: Path) -> None:
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 10
    v1 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.95})
    page = Client()
    page.force_login(personas["ds"])
    mail.outbox.clear()
    response = page.post(f"/models/breast-cancer/versions/{v1.number}/promote",
                         {"target": "stage", "reason": "first one"}, follow=True)
    content = response.content.decode()
    assert "it is blocked" in content and "Approvers have not been notified" in content
    assert "approvers have been notified" not in content
    assert mail.outbox == []
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 0
    v2 = upload(model, personas["ds"], tmp_path, metrics={"accuracy": 0.96}, c=0.5)
    response = page.post(f"/models/breast-cancer/versions/{v2.number}/promote",
                         {"target": "stage", "reason": "better"}, follow=True)
    assert "approvers have been notified" in response.content.decode()
