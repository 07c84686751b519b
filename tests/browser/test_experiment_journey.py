"""An approver reviews a promotion request opened by an A/B experiment's win: the promotion page shows the
experiment in its own block (verdict in one sentence, the interval, counts per side, the split check, guardrails and
the plot, drawn by plotly.js from our static files), the same as the experiment API says; the link leads to the
experiment's page. axe-core finds no serious or critical violation on either page, at a phone's width and a
laptop's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitoring.experiments import services
from monitoring.rollups import rollup_dirty
from registry.models import ModelVersion
from tests.browser.conftest import screenshot
from tests.browser.test_accessibility import AXE, RUN_AXE, WIDEST
from tests.browser.test_upload_journey import _sign_in
from tests.monitoring.conftest import log_rows  # noqa: F401 - fixtures
from tests.monitoring.test_experiments import LATER, after_start, history, labelled, start
from tests.registry.conftest import deploy_now, fresh_serving_cache, two_versions  # noqa: F401 - fixtures

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_the_approver_sees_the_experiment_behind_a_promotion_request(
        page: Any, browser: Any, live_server: Any, personas: dict[str, Any], two_versions: list[ModelVersion],  # noqa: F811
        log_rows: Callable[..., list[str]]) -> None:  # noqa: F811
    v1, v2 = two_versions
    model = v1.model
    deploy_now(v1, personas["ds"])
    deploy_now(v2, personas["ds"], strategy="canary", traffic_percent=50)
    history(log_rows, personas, model)
    experiment = start(personas, model, mde=0.1)
    now = after_start()
    labelled(log_rows, personas, model, n=experiment.planned_sample, accuracy=0.75, at=now, version=1,
             role="champion", seed=2)
    labelled(log_rows, personas, model, n=experiment.planned_sample, accuracy=0.92, at=now, version=2,
             role="canary", seed=3)
    rollup_dirty()
    experiment = services.experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert experiment is not None and experiment.promotion is not None

    _sign_in(page, "alex")
    page.click("nav.mainnav >> text=Promotions")
    page.click(f"a[href='/promotions/{experiment.promotion.uid}/'] >> text=Review")
    panel = page.locator("[data-testid=promotion-experiment]")
    panel.wait_for()
    api = page.request.get(f"/api/v1/experiments/{experiment.uid}/").json()
    assert panel.locator("[data-testid=experiment-verdict]").get_attribute("data-verdict") == "challenger_wins"
    assert panel.locator("[data-testid=experiment-sentence]").inner_text() == api["sentence"]
    assert panel.locator("[data-testid=experiment-interval]").inner_text() == api["analysis"]["interval_display"]
    assert panel.locator("[data-testid=experiment-difference]").inner_text() == \
        api["analysis"]["difference_display"]
    for side in ("champion", "challenger"):
        row = panel.locator(f"[data-testid=experiment-arms] tr[data-arm={side}]")
        assert row.locator("[data-testid=arm-outcomes]").inner_text() == str(api["analysis"]["arms"][side]["outcomes"])
    assert "no sample-ratio mismatch" in panel.locator("[data-testid=experiment-srm]").inner_text()
    # The plot: the band and the line, drawn once plotly.js (our static file) has loaded.
    panel.locator("[data-testid=experiment-chart]").scroll_into_view_if_needed()
    page.wait_for_selector("#chart-experiment .main-svg", timeout=30_000)
    assert page.locator("#chart-experiment .scatterlayer .trace").count() == 3
    screenshot(page, "promotion-experiment-1366")
    assert not page.console_errors, page.console_errors

    page.click("[data-testid=promotion-experiment] >> text=The experiment's page")
    page.wait_for_selector("[data-testid=experiment]")
    assert page.locator("[data-testid=experiment-sentence]").inner_text() == api["sentence"]
    assert page.locator("[data-testid=experiment-promotion] a").get_attribute("href") == \
        f"/promotions/{experiment.promotion.uid}/"

    # Accessibility of both pages, at a phone's width and a laptop's.
    problems: list[str] = []
    context = browser.new_context(base_url=live_server.url, bypass_csp=True)  # to inject axe
    checker = context.new_page()
    _sign_in(checker, "alex")
    for width in (412, 1366):
        checker.set_viewport_size({"width": width, "height": 900})
        for path in (f"/promotions/{experiment.promotion.uid}/", f"/experiments/{experiment.uid}/"):
            checker.goto(path)
            checker.add_script_tag(path=str(Path(AXE)))
            problems += [f"{path} at {width}: {v}" for v in checker.evaluate(RUN_AXE)]
            wide = checker.evaluate(WIDEST)
            if wide:
                problems.append(f"{path} at {width}: scrolls sideways by {wide[0]} px ({wide[1]})")
    context.close()
    assert not problems, "\n".join(problems)
