"""A data scientist asks for prod; two approvers approve in their own browsers (the second confirms the password);
a real worker deploys and prod serves the new version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from portal import services as portal_services
from portal.models import Team
from registry import services
from registry.models import PromotionRequest
from tests.browser.conftest import screenshot
from tests.browser.test_upload_journey import _sign_in
from tests.conftest import PASSWORD
from tests.registry.conftest import rows
from tests.registry.test_promotions import promote_live, upload

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _approve(browser: Any, base_url: str, username: str, uid: str, comment: str) -> Any:
    context = browser.new_context(base_url=base_url)
    page = context.new_page()
    _sign_in(page, username)
    page.click("nav.mainnav >> text=Promotions")
    page.click(f"a[href='/promotions/{uid}/'] >> text=Review")
    page.wait_for_selector("[data-testid=gates]")
    assert page.locator("[data-gate] .status-failed").count() == 0, page.inner_text("[data-testid=gates]")
    page.fill("textarea[name=comment]", comment)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[value=approve]")
    return page


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

    first = _approve(browser, live_server.url, "alex", uid, "Metrics and signature check out.")
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
