"""A data scientist puts one endpoint in front of three models in Chromium: creates it from the Endpoints page, adds a
field rule on its page, and a pipeline's token then scores rows that go to different models through the live
server; a viewer of the team reads the page without its controls. Screenshots at 412 and 1,366 px; axe finds no
violation of any impact."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from portal import services as portal_services
from portal.models import AuditEvent
from registry.models import ModelVersion
from tests.browser.test_accessibility import AXE, RUN_AXE
from tests.browser.test_truth_journeys import document
from tests.browser.test_upload_journey import _sign_in
from tests.registry import files
from tests.registry.endpoints.conftest import CONSTANT, three_models  # noqa: F401 - fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _axe(page: Any) -> list[str]:
    page.add_script_tag(content=AXE.read_text())
    return list(page.evaluate(RUN_AXE))


def test_a_data_scientist_routes_rows_to_three_models_through_one_endpoint(
        browser: Any, live_server: Any, personas: dict[str, Any],
        three_models: dict[str, ModelVersion]) -> None:  # noqa: F811
    context = browser.new_context(base_url=live_server.url, bypass_csp=True)  # to inject axe
    page = context.new_page()
    _sign_in(page, "dana")
    page.click("nav.mainnav >> text=Endpoints")
    page.wait_for_selector("[data-testid=no-endpoints]")
    page.fill("#ep-name", "web")
    page.fill("#ep-default", "beta")
    with page.expect_navigation():
        page.click("[data-testid=endpoint-create-submit]")
    assert page.inner_text("[data-testid=endpoint-url]") == "/api/v1/serve/endpoints/web/dev/invocations"

    page.select_option("#kind-0", "field_in")
    page.fill("#key-0", "region")
    page.fill("#values-0", "eu, uk")
    page.select_option("#model-0", "alpha")
    page.select_option("#kind-1", "field_equals")
    page.fill("#key-1", "segment")
    page.fill("#values-1", "2")
    page.select_option("#model-1", "gamma")
    with page.expect_navigation():
        page.click("[data-testid=endpoint-rules-save]")
    assert "The rules are saved" in page.inner_text(".messages")
    rows = page.locator("[data-testid=endpoint-rule]")
    assert rows.count() == 3 and "every other row" in rows.nth(2).inner_text()
    assert "v1" in rows.nth(0).inner_text()  # alpha serves v1 in dev
    assert AuditEvent.objects.filter(action="endpoint.change", actor_username="dana").count() == 1
    assert not _axe(page)
    document(page, "endpoint")

    _token, plaintext = portal_services.token_create(user=personas["ds"], name="pipeline", actor=personas["ds"])
    X, _y = files._data()
    columns = [*X.columns, "region", "segment"]
    data = [[*row, region, segment] for row, region, segment in
            zip(X.head(3).to_numpy().tolist(), ("uk", "us", "us"), (0, 2, 1), strict=True)]
    answer = requests.post(f"{live_server.url}/api/v1/serve/endpoints/web/dev/invocations", timeout=30,
                           headers={"Authorization": f"Bearer {plaintext}", "Content-Type": "application/json"},
                           data=json.dumps({"dataframe_split": {"columns": columns, "data": data}}))
    assert answer.status_code == 200, answer.text
    assert answer.json()["models"] == ["alpha", "gamma", "beta"]
    assert [round(p, 6) for p in answer.json()["predictions"]] == [CONSTANT[m] for m in ("alpha", "gamma", "beta")]

    reader = browser.new_context(base_url=live_server.url).new_page()
    _sign_in(reader, "vic")
    reader.goto("/endpoints/web/dev/")
    assert reader.locator("[data-testid=endpoint-rule]").count() == 3
    for control in ("endpoint-rules-form", "endpoint-delete-form"):
        assert reader.locator(f"[data-testid={control}]").count() == 0, control
    reader.context.close()
    context.close()
