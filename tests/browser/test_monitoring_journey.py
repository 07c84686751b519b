"""An approver opens Monitoring, finds the red light, reads every panel of the model's page in a real browser,
inspects the drifting feature against its reference and acknowledges the alert."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from monitoring.alerts import evaluate_alerts
from monitoring.models import Alert, Feedback
from monitoring.rollups import mark_dirty_for_predictions, rollup_dirty
from registry.models import EnvironmentState, ModelVersion
from tests.browser.conftest import screenshot
from tests.browser.test_upload_journey import _sign_in
from tests.monitoring.conftest import live, log_rows, reference_matrix  # noqa: F401 - fixtures
from tests.registry.conftest import fresh_serving_cache, two_versions  # noqa: F401 - fixtures

pytestmark = [pytest.mark.browser, pytest.mark.slow]
PANELS = ["chart-throughput", "chart-latency", "chart-accuracy", "chart-predictions", "chart-heatmap",
          "chart-feature", "chart-roles"]


def test_an_approver_reads_every_panel_and_acknowledges_the_drift_alert(
        page: Any, live: ModelVersion, two_versions: list[ModelVersion],  # noqa: F811
        log_rows: Callable[..., list[str]]) -> None:  # noqa: F811
    _columns, X, y = reference_matrix()
    rng = np.random.default_rng(1)
    now = timezone.now()
    ids: list[str] = []
    for minutes_ago in range(50, 0, -5):  # an hour of traffic, drifting more as time goes on
        shift = 1.0 + (50 - minutes_ago) / 25
        rows = X[rng.integers(0, len(X), 60)] * shift
        ids += log_rows(rows, at=now - dt.timedelta(minutes=minutes_ago), outputs=rng.integers(0, 2, 60).tolist(),
                        latencies=rng.lognormal(1.2, 0.5, 60).tolist(), errors=1 if minutes_ago == 20 else 0)
        log_rows(rows[:15], at=now - dt.timedelta(minutes=minutes_ago), outputs=rng.integers(0, 2, 15).tolist(),
                 role="canary", version=two_versions[1].number)
    Feedback.objects.bulk_create([Feedback(prediction_id=i, actual=int(rng.integers(0, 2))) for i in ids[:300]])
    mark_dirty_for_predictions(ids[:300])
    rollup_dirty()
    state = EnvironmentState.objects.get(model=live.model, environment="dev")
    state.mode = "canary"
    state.challenger_percent = 20
    state.save()
    evaluate_alerts()
    assert Alert.objects.filter(kind="drift", severity="alert").exists()

    _sign_in(page, "alex")
    page.click("nav.mainnav >> text=Monitoring")
    row = page.locator("[data-testid=portfolio-row]", has_text="churn")
    assert row.get_attribute("data-light") == "red"
    row.locator("a", has_text="churn").click()
    page.wait_for_selector("[data-testid=kpis]")
    page.click("[data-testid=ranges] >> text=Last hour")
    page.wait_for_url("**range=1h")
    for panel in PANELS:  # every panel drew a Plotly chart with data, not a "nothing to show" note
        page.wait_for_selector(f"#{panel} .main-svg", timeout=15_000)
        assert page.eval_on_selector(f"#{panel}", "el => (el.data || []).length") > 0, panel
    assert page.inner_text("[data-testid=kpi-predictions]") == "750"
    assert page.inner_text("[data-testid=kpi-accuracy]").endswith("%")
    assert page.locator("[data-testid=drift-row] .status-alert").count() > 0

    # Clicking a feature's row in the heatmap shows that feature against its reference.
    first = page.inner_text("[data-testid=feature-name]")
    target = page.eval_on_selector("#chart-heatmap", f"el => el.data[0].y.find((f) => f !== {first!r})")
    page.evaluate(f"""() => {{
        const el = document.getElementById('chart-heatmap');
        el.emit('plotly_click', {{points: [{{y: {target!r}}}]}});
    }}""")
    page.locator("[data-testid=feature-name]", has_text=target).wait_for()
    labels = page.eval_on_selector("#chart-feature", "el => el.data.map((t) => t.name)")
    assert labels == ["reference", "current"]
    screenshot(page, "monitoring-page")

    page.locator("[data-testid=alert-row][data-status=firing] [data-testid=acknowledge]").first.click()
    page.locator(".messages, [role=status], body", has_text="Alert acknowledged").first.wait_for()
    assert page.locator("[data-testid=alert-row][data-status=acknowledged]").count() == 1
    assert Alert.objects.filter(status="acknowledged").get().acknowledged_by.get_username() == "alex"
    assert not page.console_errors, page.console_errors
