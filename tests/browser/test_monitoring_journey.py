"""An approver opens Monitoring, finds the red light, reads every panel of the model's page in a real browser,
inspects the drifting feature against its reference and acknowledges the alert."""

from __future__ import annotations

import datetime as dt
import shutil
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
from tests.conftest import ROOT
from tests.browser.test_upload_journey import _sign_in
from tests.monitoring.conftest import live, log_rows, reference_matrix  # noqa: F401 - fixtures
from tests.registry.conftest import fresh_serving_cache, two_versions  # noqa: F401 - fixtures

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SCREENSHOTS = ROOT / "docs" / "screenshots"
# What a person would see wrong: a tick label outside its chart (clipped), or a legend drawn over the plot area.
READABLE_JS = r"""(id) => {
  const el = document.getElementById(id);
  const box = el.getBoundingClientRect();
  const problems = [];
  for (const t of el.querySelectorAll('.xtick text, .ytick text, .y2tick text')) {
    const r = t.getBoundingClientRect();
    if (!t.textContent || r.width === 0) continue;
    if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
      problems.push('tick ' + JSON.stringify(t.textContent) + ' outside the chart');
  }
  const plotArea = el.querySelector('.nsewdrag');
  const legend = el.querySelector('.legend');
  if (plotArea && legend) {
    const a = plotArea.getBoundingClientRect(), b = legend.getBoundingClientRect();
    if (b.width && a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom)
      problems.push('legend over the plot area');
  }
  const rotated = [...el.querySelectorAll('.xtick text')].filter((t) => /rotate\((?!0)/.test(t.getAttribute('transform') || ''));
  if (el.dataset.testid !== 'chart-feature' && el.dataset.testid !== 'chart-predictions' && rotated.length)
    problems.push(rotated.length + ' rotated time labels');
  return {problems, width: box.width, left: box.left, top: box.top};
}"""


def _assert_readable(page: Any, width: int) -> None:
    boxes = {}
    for panel in PANELS:
        result = page.evaluate(READABLE_JS, panel)
        assert not result["problems"], (width, panel, result["problems"])
        boxes[panel] = result
    # Heatmap feature names in full (no "…").
    names = page.eval_on_selector("#chart-heatmap", "el => [...el.querySelectorAll('.ytick text')].map((t) => t.textContent)")
    assert names == page.eval_on_selector("#chart-heatmap", "el => el.data[0].y.slice()"), names
    main = page.eval_on_selector("main", "el => el.getBoundingClientRect().width")
    throughput, latency = boxes["chart-throughput"], boxes["chart-latency"]
    if width < 1400:  # one chart per row, at the page's full width
        assert latency["top"] > throughput["top"] and throughput["width"] > main * 0.85
    else:  # two per row
        assert latency["top"] == throughput["top"] and latency["left"] > throughput["left"] + throughput["width"]
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
PANELS = ["chart-throughput", "chart-latency", "chart-accuracy", "chart-predictions", "chart-heatmap",
          "chart-feature", "chart-roles"]


def test_an_approver_reads_every_panel_and_acknowledges_the_drift_alert(
        page: Any, live: ModelVersion, two_versions: list[ModelVersion],  # noqa: F811
        log_rows: Callable[..., list[str]]) -> None:  # noqa: F811
    _columns, X, _y = reference_matrix()
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
    # A deployment younger than a day opens on the last hour, where its data is, without asking.
    assert "range=" not in page.url
    assert page.inner_text("[data-testid=ranges] [aria-current=true]") == "Last hour"
    for panel in PANELS:  # every panel drew a Plotly chart with data, not a "nothing to show" note
        page.locator(f"#{panel}").scroll_into_view_if_needed()
        page.wait_for_selector(f"#{panel} .main-svg", timeout=15_000)
        assert page.eval_on_selector(f"#{panel}", "el => (el.data || []).length") > 0, panel
    # The tiles are the serving version's (600 of v1), not v1 and the canary added together (750).
    assert page.inner_text("[data-testid=kpi-predictions]") == "600"
    assert page.inner_text("[data-testid=kpi-throughput]") not in ("0.00/s", "0.0/min")
    assert page.inner_text("[data-testid=kpi-accuracy]").endswith("%")
    assert page.locator("[data-testid=drift-row] .status-alert").count() > 0
    # A classifier's predictions by class, not on numeric bins; every chart says in words what it shows.
    assert page.eval_on_selector("#chart-predictions", "el => el.data[0].x") == ["0", "1"]
    assert page.inner_text("[data-testid=summary-predictions]").startswith("Predictions by class: 0 ")
    assert page.locator(".chart-summary:empty").count() == 0
    assert page.locator(".modebar").count() == 0  # no Plotly toolbar anywhere

    for width in (1366, 1920):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(400)  # Plotly's responsive relayout
        _assert_readable(page, width)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)  # full page, both widths: the README shows them
        shutil.copyfile(screenshot(page, f"monitoring-page-{width}"), SCREENSHOTS / f"monitoring-{width}.png")

    # The drift feature is chosen from the table by keyboard too, and the drill-down names it in full.
    button = page.locator("[data-testid=drift-row] button[data-feature]").last
    chosen = button.get_attribute("data-feature")
    button.focus()
    page.keyboard.press("Enter")
    page.locator("[data-testid=feature-name]", has_text=chosen).wait_for()
    assert page.inner_text("[data-testid=feature-name]") == chosen
    assert button.get_attribute("aria-pressed") == "true"
    assert chosen in page.inner_text("[data-testid=summary-feature]")

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
    acknowledged_by = Alert.objects.filter(status="acknowledged").get().acknowledged_by
    assert acknowledged_by is not None and acknowledged_by.get_username() == "alex"
    assert not page.console_errors, page.console_errors
