"""axe-core on every page of the three journeys (data scientist, approver, compliance officer), on a phone (412 px)
and a laptop (1,366 px): no serious or critical violation, and no page scrolls sideways.

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
from monitoring.rollups import rollup_dirty
from registry.models import Deployment, ModelVersion
from tests.browser.test_upload_journey import _sign_in
from tests.monitoring.conftest import live, log_rows, reference_matrix  # noqa: F401 - fixtures
from tests.registry.conftest import fresh_serving_cache, two_versions  # noqa: F401 - fixtures

pytestmark = [pytest.mark.browser, pytest.mark.slow]
AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
WIDTHS = (412, 1366)
RUN_AXE = """async () => {
  const result = await window.axe.run(document, {resultTypes: ['violations']});
  return result.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical')
    .map((v) => v.id + ' (' + v.impact + '): ' + v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(' | '));
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
