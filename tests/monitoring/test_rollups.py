"""Rollups equal a recomputation from the raw rows, merge into hours and days exactly, are idempotent, and take late
ground truth into the buckets the predictions were made in."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from monitoring import rollups
from monitoring.models import Granularity, PredictionLog, Rollup, RollupDirty
from monitoring.additive import add
from monitoring.rollups import compute_minutes, percentile, rollup_dirty
from monitoring.selectors import accuracy_metrics
from registry.models import ModelVersion
from tests.monitoring.conftest import NOW, reference_matrix

pytestmark = pytest.mark.django_db(transaction=True)


def same(a: Any, b: Any) -> bool:
    """Equal, with floats compared to 1e-9 relative (sums are kept rounded to 9 decimals)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return bool(a == pytest.approx(b, rel=1e-9, abs=1e-8))
    return bool(a == b)


def _stored(granularity: str) -> dict[tuple[Any, int, str], dict[str, Any]]:
    return {(r.start, r.version, r.role): {"count": r.count, "errors": r.errors, "labelled": r.labelled,
                                           "data": r.data}
            for r in Rollup.objects.filter(granularity=granularity)}


def _spread(log_rows: Callable[..., list[str]]) -> dict[str, Any]:
    """Rows over two days: several minutes, two hours, two days, errors, a canary, varied latencies."""
    _columns, X, y = reference_matrix()
    rng = np.random.default_rng(7)
    written: dict[str, Any] = {"latencies": [], "ids": []}
    for k, offset in enumerate([dt.timedelta(0), dt.timedelta(minutes=1, seconds=30), dt.timedelta(minutes=59),
                                dt.timedelta(hours=1, minutes=5), dt.timedelta(days=1, hours=3)]):
        rows = X[k * 40:(k + 1) * 40] * (1.0 + 0.3 * k)
        latencies = rng.lognormal(1.0, 0.8, size=len(rows)).tolist()
        written["latencies"] += latencies
        written["ids"] += log_rows(rows, at=NOW + offset, outputs=y[k * 40:(k + 1) * 40].tolist(),
                                   latencies=latencies, errors=2 if k == 1 else 0,
                                   role="canary" if k == 3 else "champion")
    return written


def test_rollups_equal_a_recomputation_from_raw_rows(live: ModelVersion, log_rows: Callable[..., list[str]]) -> None:
    written = _spread(log_rows)
    assert RollupDirty.objects.count() == 5, "each written minute is marked in the writer's transaction"
    assert rollup_dirty() == 5
    assert not RollupDirty.objects.exists()

    minutes = _stored(Granularity.MINUTE)
    recomputed = compute_minutes("churn", "dev", NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=3))
    assert same(minutes, recomputed)
    assert sum(m["count"] for m in minutes.values()) == PredictionLog.objects.count() == 200
    assert sum(m["errors"] for m in minutes.values()) == 2

    # Hours are exactly the sum of their minutes, days of their hours.
    for granularity, finer in ((Granularity.HOUR, minutes), (Granularity.DAY, _stored(Granularity.HOUR))):
        expected: dict[tuple[Any, int, str], dict[str, Any]] = {}
        for (start, version, role), part in finer.items():
            key = (rollups.bucket_start(start, granularity), version, role)
            expected[key] = add(expected[key], part) if key in expected else part
        assert same(_stored(granularity), expected)

    # A feature's histogram is numpy's on the reference bins; a latency percentile is within a bin of numpy's.
    profile = live.reference.profile["features"]["mean radius"]
    raw = np.array([r.inputs[0] for r in PredictionLog.objects.all()])
    edges = np.concatenate(([-np.inf], profile["edges"], [np.inf]))
    day = Rollup.objects.filter(granularity=Granularity.DAY)
    merged: dict[str, Any] = {}
    for r in day:
        merged = add(merged, r.data)
    assert merged["features"]["mean radius"][:-1] == np.histogram(raw, bins=edges)[0].tolist()
    p95 = percentile(merged["latency"], 0.95)
    assert p95 is not None and abs(p95 / np.percentile(written["latencies"], 95) - 1) < 0.13


def test_rolling_up_again_changes_nothing(live: ModelVersion, log_rows: Callable[..., list[str]]) -> None:
    _spread(log_rows)
    rollup_dirty()
    before = {g: _stored(g) for g in Granularity.values}
    rollups.mark_dirty(("churn", "dev", r.start) for r in Rollup.objects.filter(granularity=Granularity.MINUTE))
    assert rollup_dirty() == 5
    assert same({g: _stored(g) for g in Granularity.values}, before)


def test_rows_arriving_late_for_a_rolled_up_minute_correct_its_hour_and_day(
        live: ModelVersion, log_rows: Callable[..., list[str]]) -> None:
    _columns, X, _y = reference_matrix()
    log_rows(X[:10], at=NOW)
    rollup_dirty()
    log_rows(X[10:15], at=NOW + dt.timedelta(seconds=30))  # the flusher was late: same minute
    rollup_dirty()
    for granularity in Granularity.values:
        (row,) = Rollup.objects.filter(granularity=granularity)
        assert row.count == 15


def test_late_ground_truth_lands_in_the_buckets_of_its_predictions(
        live: ModelVersion, log_rows: Callable[..., list[str]], personas: dict[str, Any],
        api_as: Callable[[Any], Any]) -> None:
    _columns, X, y = reference_matrix()
    early = log_rows(X[:50], at=NOW, outputs=y[:50].tolist())
    log_rows(X[50:100], at=NOW + dt.timedelta(hours=2), outputs=y[50:100].tolist())
    rollup_dirty()
    assert Rollup.objects.filter(labelled__gt=0).count() == 0
    # Days later, the truth for the early predictions: 40 right, 10 wrong.
    actual = [int(v) for v in y[:40]] + [1 - int(v) for v in y[40:50]]
    response = api_as(personas["ds"]).post("/api/v1/serve/churn/dev/feedback",
                                           [{"prediction_id": i, "actual": a} for i, a in zip(early, actual, strict=True)],
                                           format="json")
    assert response.status_code == 202, response.content
    assert RollupDirty.objects.count() == 1
    rollup_dirty()
    hours = {r.start: r for r in Rollup.objects.filter(granularity=Granularity.HOUR)}
    assert hours[NOW].labelled == 50 and hours[NOW + dt.timedelta(hours=2)].labelled == 0
    metrics = accuracy_metrics(hours[NOW].data["truth"], "classification")
    assert metrics["accuracy"] == pytest.approx(0.8)
    from sklearn.metrics import f1_score, precision_score, recall_score

    predicted = [int(v) for v in y[:50]]
    assert metrics["precision"] == pytest.approx(precision_score(actual, predicted))
    assert metrics["recall"] == pytest.approx(recall_score(actual, predicted))
    assert metrics["f1"] == pytest.approx(f1_score(actual, predicted))


def test_regression_sums_give_mae_rmse_and_r2() -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(3)
    actual = rng.normal(10, 3, 500)
    predicted = actual + rng.normal(0, 1, 500)
    spec = rollups.VersionSpec(1, [], None, "regression")
    rows = [(1.0, "", None, float(p), float(a)) for p, a in zip(predicted, actual, strict=True)]
    half = [rollups.summarise(rows[:200], spec), rollups.summarise(rows[200:], spec)]
    merged = add(half[0], half[1])
    metrics = accuracy_metrics(merged["truth"], "regression")
    assert metrics["mae"] == pytest.approx(mean_absolute_error(actual, predicted))
    assert metrics["rmse"] == pytest.approx(mean_squared_error(actual, predicted) ** 0.5)
    assert metrics["r2"] == pytest.approx(r2_score(actual, predicted))


def test_a_mark_made_while_its_minute_is_rolled_up_survives_and_concurrent_marks_are_rows_of_their_own(
        live: ModelVersion, log_rows: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    _columns, X, _y = reference_matrix()
    log_rows(X[:10], at=NOW)
    log_rows(X[10:20], at=NOW + dt.timedelta(seconds=10))  # a second flusher, same minute: its own mark, no upsert
    assert RollupDirty.objects.filter(minute=NOW).count() == 2

    original = rollups.rollup_range

    def marked_meanwhile(*args: Any, **kwargs: Any) -> int:
        rollups.mark_dirty([("churn", "dev", NOW)])  # a flusher commits rows for this minute mid-roll-up
        return original(*args, **kwargs)

    monkeypatch.setattr(rollups, "rollup_range", marked_meanwhile)
    assert rollup_dirty() == 1, "two marks of one minute are one minute rolled up"
    assert RollupDirty.objects.count() == 1, "the mark made meanwhile was not read, so it is not deleted"
    monkeypatch.setattr(rollups, "rollup_range", original)
    assert rollup_dirty() == 1 and not RollupDirty.objects.exists()
    (row,) = Rollup.objects.filter(granularity=Granularity.MINUTE)
    assert row.count == 20
