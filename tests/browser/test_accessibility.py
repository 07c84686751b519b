"""axe-core on every page of the three journeys (data scientist, approver, compliance officer), on a phone (412 px)
and a laptop (1,366 px): no violation of any impact (minor and moderate included), and no page scrolls sideways.

axe-core (tests/browser/vendor/axe.min.js, from the npm registry, MPL-2.0) is injected by Playwright into each page;
it is never served to users. One test walks every page, so the browser and the live server start once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from monitoring.alerts import evaluate_alerts
from monitoring.flush import flush_predictions
from monitoring.rollups import rollup_dirty
from registry.models import Deployment, ModelVersion
from registry.promotions import services as promotions
from registry.versions import services as versions
from tests.browser.test_upload_journey import _sign_in
from tests.monitoring.conftest import live, log_rows, reference_matrix  # noqa: F401 - fixtures
from tests.registry.conftest import deploy_now, fresh_serving_cache, serving, two_versions  # noqa: F401
from tests.registry.test_gdpr import _predict

pytestmark = [pytest.mark.browser, pytest.mark.slow]
AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
WIDTHS = (412, 1366)
RUN_AXE = """async () => {
  const result = await window.axe.run(document, {resultTypes: ['violations']});
  return result.violations.map((v) => v.id + ' (' + v.impact + '): ' + v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(' | '));
}"""


WIDEST = """() => {
  const over = document.documentElement.scrollWidth - window.innerWidth;
  if (over <= 0) return null;
  const culprit = [...document.querySelectorAll('body *')].filter((el) => el.getBoundingClientRect().right > window.innerWidth + 0.5)
    .map((el) => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + (el.className && el.className.baseVal === undefined ? '.' + String(el.className).split(' ').join('.') : '')).slice(-3);
  return [over, culprit.join(', ')];
}"""


def _journeys(model: str, version: int, deployment: str, event: int) -> dict[str, list[str]]:
    return {
        "dana": ["/", "/models/", f"/models/{model}/", "/models/new", f"/models/{model}/upload",
                 f"/models/{model}/versions/{version}/", f"/deployments/{deployment}/",
                 f"/models/{model}/environments/dev/", f"/models/{model}/batch/", "/account/"],
        "alex": ["/promotions/", "/monitoring/", f"/models/{model}/environments/dev/monitoring"],
        "casey": ["/audit/", f"/audit/events/{event}/", "/compliance/processing"],
    }


def test_every_page_of_the_three_journeys_passes_axe_at_phone_and_laptop_widths(
        browser: Any, live_server: Any, live: ModelVersion,  # noqa: F811
        log_rows: Callable[..., list[str]]) -> None:  # noqa: F811
    _columns, X, _y = reference_matrix()
    rng = np.random.default_rng(3)
    for minutes_ago in (40, 25, 10):
        log_rows(X[rng.integers(0, len(X), 80)] * 1.5, at=timezone.now() - dt.timedelta(minutes=minutes_ago),
                 outputs=rng.integers(0, 2, 80).tolist(), latencies=rng.lognormal(1.2, 0.4, 80).tolist())
    rollup_dirty()
    evaluate_alerts()
    from portal.models import AuditEvent

    deployment = Deployment.objects.filter(model=live.model).latest("created_at")
    urls = _journeys(live.model.name, live.number, str(deployment.uid), AuditEvent.objects.latest("seq").seq)
    script = AXE.read_text()
    found: list[str] = []
    visited = 0
    for user, paths in urls.items():
        context = browser.new_context(base_url=live_server.url, bypass_csp=True)  # to inject axe
        page = context.new_page()
        _sign_in(page, user)
        for width in WIDTHS:
            page.set_viewport_size({"width": width, "height": 900})
            for path in paths:
                response = page.goto(path)
                assert response is not None and response.status == 200, (user, path, response and response.status)
                page.wait_for_load_state("load")
                for chart in page.locator(".chart").all():  # charts draw near the viewport: bring each there
                    chart.scroll_into_view_if_needed()
                    page.wait_for_function("(el) => !el.classList.contains('chart') || el.querySelector('.main-svg')",
                                           arg=chart.element_handle(), timeout=15_000)
                page.add_script_tag(content=script)
                for violation in page.evaluate(RUN_AXE):
                    found.append(f"{width}px {path} as {user}: {violation}")
                overflow = page.evaluate(WIDEST)
                if overflow:
                    found.append(f"{width}px {path} as {user}: scrolls sideways by {overflow[0]} px ({overflow[1]})")
                visited += 1
        context.close()
    assert visited == 2 * sum(len(p) for p in urls.values())
    assert not found, "\n".join(found)


def _submit(selector: str, fill: dict[str, str] | None = None, check: str = "") -> Callable[[Any], None]:
    """A step that fills and submits a form on the current page, then waits for the next page to load."""
    def step(page: Any) -> None:
        for field, value in (fill or {}).items():
            page.fill(field, value)
        if check:
            page.check(check)
        with page.expect_navigation():
            page.click(selector)
    return step


def _wait(selector: str) -> Callable[[Any], None]:
    """A step that waits (up to two minutes) for a page that refreshes itself to show ``selector``."""
    def step(page: Any) -> None:
        page.wait_for_selector(selector, timeout=120_000)
    return step


def _then(*steps: Callable[[Any], None]) -> Callable[[Any], None]:
    def step(page: Any) -> None:
        for each in steps:
            each(page)
    return step


def test_the_pages_of_issue_33_pass_axe_with_no_violation_of_any_impact(
        browser: Any, live_server: Any, serving: Any, personas: dict[str, Any], settings: Any,  # noqa: F811
        log_rows: Callable[..., list[str]], worker_factory: Any) -> None:  # noqa: F811
    """The nine pages bench/lighthouse.py measures (models, model, version, environment, promotion, monitoring, audit,
    subject access, erasure) and the rest of issue 33's (the blocked promotion, monitoring per version, the GDPR
    report and receipt, rollback's confirmation, aliases and compare): 0 axe violations of any impact (not only serious ones) at 412 and 1,366 px, and nothing scrolls sideways."""
    settings.PORTAL_PROMOTION_MIN_PREDICTIONS = 50
    v1, v2 = ModelVersion.objects.filter(model__name="churn").order_by("number")
    _predict(serving, ["alice@example.org", "bob"])
    flush_predictions()
    _columns, X, _y = reference_matrix()
    log_rows(X[:60], at=timezone.now() - dt.timedelta(minutes=10), outputs=[1] * 60, version=v1.number)
    rollup_dirty()
    deployment = deploy_now(v2, personas["ds"])
    versions.alias_set(model=v1.model, name="champion", version=v2, actor=personas["ds"])
    promotion = promotions.promotion_request(version=v2, target="stage", reason="v2 scores higher.",
                                             actor=personas["ds"])
    subject = {"#subject-id": "alice@example.org"}
    journeys: dict[str, list[Any]] = {
        "dana": ["/models/", "/models/churn/", "/models/churn/versions/2/", "/models/churn/compare?a=1&b=2",
                 f"/deployments/{deployment.uid}/",
                 "/models/churn/environments/dev/", _submit("[data-testid=rollback-start]")],
        "alex": [f"/promotions/{promotion.uid}/", "/promotions/?status=all", "/monitoring/",
                 "/models/churn/environments/dev/monitoring", "/models/churn/environments/dev/monitoring?version=1"],
        # the search leads to the report's page, which refreshes itself until a worker has compiled it
        "casey": ["/compliance/subjects/", _then(_submit("[data-testid=subject-search] button", subject),
                                                 _wait("[data-testid=subject-report]")),
                  "/compliance/erasure/", _submit("[data-testid=erasure-start] button", subject),
                  _submit("[data-testid=erasure-submit]", {"#erasure-reason": "axe"}, check="input[name=confirm]"),
                  "/audit/", "/"],
    }
    worker_factory()
    script = AXE.read_text()
    found: list[str] = []
    visited = 0
    for user, steps in journeys.items():
        context = browser.new_context(base_url=live_server.url, bypass_csp=True)  # to inject axe
        page = context.new_page()
        _sign_in(page, user)
        for width in WIDTHS:
            page.set_viewport_size({"width": width, "height": 900})
            for step in steps:
                if isinstance(step, str):
                    response = page.goto(step)
                    assert response is not None and response.status == 200, (user, step, response and response.status)
                else:
                    step(page)
                page.wait_for_load_state("load")
                for chart in page.locator(".chart").all():
                    chart.scroll_into_view_if_needed()
                    page.wait_for_function("(el) => !el.classList.contains('chart') || el.querySelector('.main-svg')",
                                           arg=chart.element_handle(), timeout=15_000)
                page.add_script_tag(content=script)
                for violation in page.evaluate(RUN_AXE):
                    found.append(f"{width}px {page.url} as {user}: {violation}")
                overflow = page.evaluate(WIDEST)
                if overflow:
                    found.append(f"{width}px {page.url} as {user}: scrolls sideways by {overflow[0]} px ({overflow[1]})")
                visited += 1
        context.close()
    assert visited == 2 * sum(len(s) for s in journeys.values())
    assert not found, "\n".join(found)
