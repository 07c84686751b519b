"""A data scientist asks for prod; two approvers approve in their own browsers (the second confirms the password);
a real worker deploys and prod serves the new version. The first approver reads the live evidence (the same figures
as the API's), mistypes the password and keeps the comment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from portal import services as portal_services
from portal.models import Team
from registry.models import PromotionRequest
from registry.versions import services
from tests.browser.conftest import screenshot
from tests.browser.test_upload_journey import _sign_in, shoot
from tests.conftest import PASSWORD
from tests.registry.conftest import rows
from tests.registry.promotions.test_promotions import _log, promote_live, upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _open(browser: Any, base_url: str, username: str, uid: str) -> Any:
    context = browser.new_context(base_url=base_url)
    page = context.new_page()
    _sign_in(page, username)
    page.click("nav.mainnav >> text=Promotions")
    page.click(f"a[href='/promotions/{uid}/'] >> text=Review")
    page.wait_for_selector("[data-testid=gates]")
    assert page.locator("[data-gate] .status-failed").count() == 0, page.inner_text("[data-testid=gates]")
    return page


def _approve(browser: Any, base_url: str, username: str, uid: str, comment: str, page: Any = None) -> Any:
    page = page or _open(browser, base_url, username, uid)
    page.fill("textarea[name=comment]", comment)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[value=approve]")
    return page


def _check_evidence_against_the_api(page: Any, uid: str, window: str) -> dict[str, Any]:
    """Every figure, threshold and verdict of the panel equals the promotion API's for the same window."""
    api = page.request.get(f"/api/v1/promotions/{uid}/evidence?window={window}").json()
    headers = page.locator("[data-testid=evidence-table] thead th[data-column]")
    assert headers.evaluate_all("hs => hs.map(h => h.dataset.column)") == [c["key"] for c in api["columns"]]
    for row in api["rows"]:
        line = page.locator(f"[data-testid=evidence-table] tr[data-metric={row['metric']}]")
        assert line.locator("th").inner_text() == row["label"]
        assert line.locator("td").first.inner_text() == row["threshold"]
        for cell in row["cells"]:
            shown = line.locator(f"td[data-column={cell['column']}]")
            assert shown.locator("[data-testid=evidence-value]").inner_text() == cell["display"], (row, cell)
            assert shown.get_attribute("data-status") == cell["status"]
            verdict = {"pass": "pass", "warn": "warn", "insufficient": "too little data"}.get(cell["status"])
            if verdict:
                assert verdict in shown.inner_text()
    return api


def test_a_data_scientist_requests_prod_two_approvers_approve_and_prod_serves_it(
        page: Any, browser: Any, live_server: Any, personas: dict[str, Any], worker_factory: Any,
        tmp_path: Path) -> None:
    model = services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    v1 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.95})
    promote_live(v1, "stage", personas)
    promote_live(v1, "prod", personas)
    v2 = upload(model, personas["ds"], tmp_path, metrics={"auc": 0.97}, c=0.5)
    promote_live(v2, "stage", personas)
    worker_factory()

    _sign_in(page, "dana")
    page.goto(f"/models/churn/versions/{v2.number}/")
    page.fill("[data-testid=promote-form] textarea[name=reason]", "A week in stage, AUC up two points.")
    page.click("[data-testid=promote-form] button[value=prod]")
    page.wait_for_selector("[data-testid=promotion-status]")
    assert page.inner_text("[data-testid=promotion-status]") == "Pending"
    assert "0 of 2 approvals" in page.inner_text("main")
    assert page.locator("[data-testid=decision-form]").count() == 0, "the requester gets no approve button"
    uid = page.url.rstrip("/").rsplit("/", 1)[-1]

    # What v2 did in stage and v1 does in prod, as the monitoring pages count it.
    _log("churn", "stage", v2.number, 120, errors=1, latency_ms=3.0)
    _log("churn", "prod", v1.number, 150, latency_ms=2.0)
    first = _open(browser, live_server.url, "alex", uid)
    first.click("[data-testid=evidence] a[data-window='1h']")
    first.wait_for_url("**window=1h*")
    api = _check_evidence_against_the_api(first, uid, "1h")
    # v2 beside v1 wherever either served: v1 served stage before prod (no predictions there in the window).
    assert [c["key"] for c in api["columns"]] == ["candidate-stage", "champion-stage", "champion-prod"]
    cells = {r["metric"]: r["cells"] for r in api["rows"]}
    assert [c["display"] for c in cells["predictions"]] == ["120", "0", "150"]
    assert cells["error_rate"][0]["display"] == "0.83%" and cells["error_rate"][0]["status"] == "pass"
    summary = first.inner_text("[data-testid=signature-summary]")
    assert summary == f"All 30 inputs unchanged from v{v1.number}."
    assert first.locator("[data-testid=signature-diff] strong").count() == 0, "the table agrees with the summary"
    for path in shoot(first, "promotion-evidence"):
        assert path.stat().st_size > 10_000

    # A mistyped password: refused, and the comment is still there to send again.
    first.fill("textarea[name=comment]", "Metrics and signature check out.")
    first.fill("input[name=password]", "not-my-password")
    first.click("button[value=approve]")
    first.wait_for_selector(".messages .error")
    assert "password" in first.inner_text(".messages .error").lower()
    assert first.input_value("textarea[name=comment]") == "Metrics and signature check out."
    assert first.input_value("input[name=password]") == "", "a password is never sent back"
    assert first.inner_text("[data-testid=promotion-status]") == "Pending"
    first.fill("input[name=password]", PASSWORD)
    first.click("button[value=approve]")
    first.wait_for_selector("text=more approvals are needed")
    assert first.inner_text("[data-testid=promotion-status]") == "Pending"

    second = _approve(browser, live_server.url, "blair", uid, "Agreed.")
    second.wait_for_selector("text=deployment has started")
    second.locator("[data-testid=deployment-status]", has_text="Live").wait_for(timeout=120_000)
    screenshot(second, "promotion-prod-live")

    promotion = PromotionRequest.objects.get(uid=uid)
    assert promotion.status == "live"
    assert [a.approver.username for a in promotion.approvals.all()] == ["alex", "blair"]
    _t, token = portal_services.token_create(user=personas["ds"], name="check", actor=personas["ds"])
    columns, data = rows(2)
    answer = requests.post(f"{live_server.url}/api/v1/serve/churn/prod/invocations",
                           json={"dataframe_split": {"columns": columns, "data": data}},
                           headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 200 and answer.json()["model_version"] == v2.number

    page.goto("/models/churn/environments/prod/")
    assert page.inner_text("[data-testid=serving-now]") == f"v{v2.number}"
    timeline = page.inner_text("[data-testid=timeline]")
    assert "alex, blair" in timeline and "A week in stage" in timeline
    assert page.console_errors == []
