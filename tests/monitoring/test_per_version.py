"""Monitoring per version: after v2 replaced v1 in dev, the page, the API and the overview show v2's figures (none
yet), never v1's under v2's name; v1's are one switch away; nothing is computed from zero rows."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from django.test import Client
from django.utils import timezone

from monitoring import selectors
from monitoring.rollups import rollup_dirty
from registry.models import ModelVersion
from tests.conftest import assert_error_shape
from tests.monitoring.conftest import live, log_rows, reference_matrix  # noqa: F401 - fixtures
from tests.registry.conftest import deploy_now, fresh_serving_cache, two_versions  # noqa: F401 - fixtures

BASE = "/api/v1/models/churn/environments/dev/monitoring?range=1h"


def test_figures_follow_the_serving_version_and_the_switcher_shows_the_one_before(
        live: ModelVersion, two_versions: list[ModelVersion], personas: dict[str, Any],  # noqa: F811
        log_rows: Callable[..., list[str]], api_as: Any) -> None:  # noqa: F811
    _columns, X, _y = reference_matrix()
    log_rows(X[:103], at=timezone.now() - dt.timedelta(minutes=5), outputs=[1] * 103, version=1)
    rollup_dirty()
    deploy_now(two_versions[1], personas["ds"])  # v2 replaces v1 in dev

    client = api_as(personas["viewer"])
    now = client.get(BASE).json()
    assert now["version"] == 2 and now["serving"]["champion"] == 2
    assert now["totals"]["predictions"] == 0 and now["totals"]["error_rate"] is None
    assert now["drift"] is None and now["heatmap"] is None, "no drift and no time axis from zero rows"
    assert now["distributions"] == {} and now["prediction_distribution"] is None
    assert now["versions"] == [{"version": 2, "serving": "champion", "predictions": 0},
                               {"version": 1, "serving": "", "predictions": 103}]
    before = client.get(BASE + "&version=1").json()
    assert before["version"] == 1 and before["totals"]["predictions"] == 103
    assert before["drift"]["version"] == 1 and before["heatmap"] is not None
    bad = assert_error_shape(client.get(BASE + "&version=9"), 400)
    assert "1, 2" in str(bad["error"])

    page = Client()
    page.force_login(personas["viewer"])
    content = page.get("/models/churn/environments/dev/monitoring?range=1h").content.decode()
    assert 'data-testid="kpi-predictions">0<' in content
    assert "Tiles, charts and tables below are v2's." in content
    assert 'data-version="1"' in content and 'data-version="2" aria-current="true"' in content
    assert "v2 made no predictions here in this range" in content
    switched = page.get("/models/churn/environments/dev/monitoring?range=1h&version=1").content.decode()
    assert 'data-testid="kpi-predictions">103<' in switched and "which does not serve here now" in switched
    assert 'href="?range=1h&amp;version=1"' in switched, "the range links keep the version"
    refused = page.get("/models/churn/environments/dev/monitoring?version=abc").content.decode()
    assert "version is one of 1, 2" in refused and 'data-testid="kpi-predictions">0<' in refused

    # The overview lists what serves now with that version's figures: v2, no predictions yet.
    rows = [r for r in selectors.portfolio(user=personas["viewer"]) if r["environment"] == "dev"]
    assert [(r["champion"], r["predictions"], r["light"]) for r in rows] == [(2, 0, "grey")]
    log_rows(X[:7], at=timezone.now() - dt.timedelta(minutes=2), outputs=[0] * 7, version=2)
    rollup_dirty()
    rows = [r for r in selectors.portfolio(user=personas["viewer"]) if r["environment"] == "dev"]
    assert [(r["champion"], r["predictions"]) for r in rows] == [(2, 7)]
    assert client.get(BASE).json()["totals"]["predictions"] == 7
