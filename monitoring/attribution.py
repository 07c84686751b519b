"""Attribution drift (issue 37, as Clarify's feature-attribution drift): does the serving version lean on its
features in production as it did on its reference data?

Each measurement explains a sample of the champion's recent logged rows with the version's own explainer, in a
sandboxed model host (the model is a program; nothing of it runs here), turns the attributions into each feature's
share of the total mean |SHAP|, and compares those shares with the shares of the version's global importance
(computed at scan time over the reference data): the distance is their total variation (half the sum of the
absolute differences: 0 when the shares agree, 1 when no feature keeps any of its share). Beat measures every
serving environment every ``PORTAL_ATTRIBUTION_DRIFT_MINUTES``; the alert rule ``attr_drift`` fires when the
latest distance reaches the model's ``attribution_drift_max`` threshold (0.2 by default).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
from django.conf import settings
from django.utils import timezone

from monitoring.models import AttributionDrift, PredictionLog
from monitoring.sensitive import reveal_row
from registry.models import EnvironmentState, ModelVersion
from registry.sandbox import hosts
from registry.serving import runtime

SAMPLE_ROWS = 500  # the most recent champion rows explained per measurement
MIN_ROWS = 50  # fewer rows than this in the window: not measured


def shares(mean_abs: np.ndarray) -> np.ndarray:
    total = float(mean_abs.sum())
    return mean_abs / total if total > 0 else mean_abs


def distance(production: dict[str, float], reference: dict[str, float]) -> float:
    names = set(production) | set(reference)
    return 0.5 * sum(abs(production.get(n, 0.0) - reference.get(n, 0.0)) for n in names)


def measure(*, state: EnvironmentState, now: dt.datetime | None = None) -> AttributionDrift:
    """Measure the champion of ``state`` over its rows of the last window; the stored measurement (with ``error``
    saying why when there was nothing to measure)."""
    from monitoring.selectors import thresholds_for

    now = now or timezone.now()
    champion: ModelVersion = state.champion.version  # type: ignore[union-attr]
    record = AttributionDrift(model=state.model, environment=state.environment, version=champion.number,
                              measured_at=now)
    info = champion.explanation or {}
    reference = {str(f["name"]): float(f["share"]) for f in info.get("features") or []}
    window = dt.timedelta(minutes=int(thresholds_for(state.model)["window_minutes"]))
    if not reference:
        record.error = f"version {champion.number} has no global importance to compare with" + (
            f" ({info['error']})" if info.get("error") else "")
        record.save()
        return record
    logged = list(PredictionLog.objects.filter(
        model_name=state.model.name, environment=state.environment, version=champion.number,
        role__in=("champion", "canary"), created_at__gte=now - window, error="", inputs__isnull=False,
    ).order_by("-created_at").values_list("inputs", flat=True)[:SAMPLE_ROWS])
    if len(logged) < MIN_ROWS:
        record.error = f"{len(logged)} logged rows in the last {int(window.total_seconds() // 60)} min (at least " \
                       f"{MIN_ROWS} are explained)"
        record.save()
        return record
    columns = [str(c) for c in info.get("columns") or runtime.input_columns(champion)]
    try:
        matrix = np.asarray([reveal_row(r, may_see=True) for r in logged], dtype="float64")
    except (TypeError, ValueError):
        record.error = "the logged inputs are not all numbers"
        record.save()
        return record
    matrix = matrix[np.isfinite(matrix).all(axis=1)] if matrix.ndim == 2 else matrix
    background = np.asarray(info["background"], dtype="float64") if info.get("background") else None
    if matrix.ndim != 2 or matrix.shape[1] != len(columns) or not len(matrix):
        record.error = "the logged inputs do not have the model's columns"
        record.save()
        return record
    loaded = runtime.load_serving_model(version=champion, kind="native", blob=None,
                                        key=f"attribution-drift-{champion.pk}")
    try:
        answer = loaded.explain(matrix, background, columns, budget=settings.PORTAL_EXPLAIN_GLOBAL_SECONDS)
    except (hosts.NoExplainer, hosts.ExplainOverBudget, hosts.HostUnavailable, hosts.HostModelError) as exc:
        record.error = f"the explainer could not run ({exc})"[:1000]
        record.save()
        return record
    finally:
        loaded.close()
    names = [str(c) for c in answer.get("columns") or columns]
    mean_abs = np.abs(np.asarray([r["attributions"] for r in answer["rows"]], dtype="float64")).mean(axis=0)
    production = {n: float(s) for n, s in zip(names, shares(mean_abs), strict=True)}
    record.rows = len(matrix)
    record.production = production
    record.reference = reference
    record.distance = distance(production, reference)
    record.method = str(answer["method"])[:100]
    record.approximate = bool(answer["approximate"])
    record.save()
    return record


def measure_all(*, now: dt.datetime | None = None) -> int:
    """A measurement for every environment that serves; the number measured (with a distance)."""
    measured = 0
    for state in EnvironmentState.objects.select_related("model", "champion__version__artifact").filter(
            champion__isnull=False):
        if measure(state=state, now=now).distance is not None:
            measured += 1
    return measured


def latest(model: Any, environment: str, version: int | None = None) -> AttributionDrift | None:
    query = AttributionDrift.objects.filter(model=model, environment=environment)
    if version is not None:
        query = query.filter(version=version)
    return query.first()


def rows_for_page(record: AttributionDrift | None, top: int = 12) -> list[dict[str, Any]]:
    """Per feature: reference share, production share and their change, the largest shares first."""
    if record is None or record.distance is None:
        return []
    names = sorted(set(record.production) | set(record.reference),
                   key=lambda n: -max(record.production.get(n, 0.0), record.reference.get(n, 0.0)))[:top]
    return [{"name": n, "reference": record.reference.get(n, 0.0), "production": record.production.get(n, 0.0),
             "change": record.production.get(n, 0.0) - record.reference.get(n, 0.0)} for n in names]


def record_json(record: AttributionDrift | None) -> dict[str, Any] | None:
    """The latest measurement for the API: what the monitoring page's table shows, every feature."""
    if record is None:
        return None
    return {"version": record.version, "measured_at": record.measured_at, "rows": record.rows,
            "distance": record.distance, "method": record.method, "approximate": record.approximate,
            "error": record.error, "features": rows_for_page(record, top=len(record.reference) + len(record.production))}
