"""Live evidence for a promotion: how the candidate has behaved where it already serves, against the champion in
the target environment, over one window.

Read from the same rollups (and the same merge, percentile, accuracy and drift code) as the monitoring pages, so a
figure here equals the one on the environment's monitoring page for the same version and window. Registered into
``registry.promotions.services`` when monitoring starts (the registry does not import monitoring).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db.models import Sum
from django.utils import timezone

from monitoring.rollups import bucket_start, rollups, version_spec
from monitoring.selectors import (
    ONLINE_ROLES,
    RANGES,
    _latency,
    _merge,
    accuracy_metrics,
    drift_report,
    granularity_for,
    thresholds_for,
)
from monitoring.models import Rollup
from registry.models import ENVIRONMENT_ORDER, ServingInterval
from registry.promotions.services import EVIDENCE_WINDOWS, GroundTruth, promotion_baseline

ORDER: list[str] = [str(e) for e in ENVIRONMENT_ORDER]


def live_predictions(model: Any, environment: str, version: int) -> int:
    """Every live (champion and canary) prediction ``version`` answered in ``environment``, from the day rollups
    (which add up every minute ever rolled up), for the promotion gate's minimum of real traffic."""
    total = Rollup.objects.filter(model_name=model.name, environment=environment, version=version, granularity="day",
                                  role__in=ONLINE_ROLES).aggregate(n=Sum("count"))["n"]
    return int(total or 0)

def accuracy_floor(thresholds: dict[str, Any], *versions: Any) -> float | None:
    """The accuracy a version is held to: the model's monitoring setting ``accuracy_min``, else the first recorded
    ``accuracy`` metric of ``versions`` (the champion's, then the candidate's) less 0.05; None when neither exists."""
    configured = thresholds.get("accuracy_min")
    if configured is not None:
        return float(configured)
    recorded = [float(a) for a in ((v.metrics or {}).get("accuracy") for v in versions if v is not None)
                if isinstance(a, int | float) and not isinstance(a, bool)]
    return recorded[0] - 0.05 if recorded else None


def ground_truth(version: Any, environment: str, baseline: Any) -> GroundTruth | None:
    """All of ``version``'s live predictions in ``environment`` that have ground truth (from the day rollups, as
    ``live_predictions`` counts them), and the floor (``baseline``'s recorded accuracy first, as the evidence table
    judges it) and minimum the monitoring settings hold them to; None for a regressor (its MAE has no floor)."""
    model = version.model
    task = version_spec(model.name, version.number).task
    if task == "regression":
        return None
    thresholds = thresholds_for(model)
    floor = accuracy_floor(thresholds, baseline, version)
    rows = list(Rollup.objects.filter(model_name=model.name, environment=environment, version=version.number,
                                      granularity="day", role__in=ONLINE_ROLES))
    truth = accuracy_metrics(_merge(rows)["data"].get("truth"), task)
    if truth.get("task") == "regression":
        return None
    return GroundTruth(labelled=int(truth.get("labelled", 0)), minimum=int(thresholds["min_labelled"]),
                      accuracy=truth.get("accuracy"), floor=floor)


# p50 and p95 have no absolute limit in the monitoring settings; the candidate is held to the champion's figure
# plus this share (a slower candidate warns, it does not block).
LATENCY_SLACK = 0.2
MIN_ROWS_FOR_RATES = 20  # the alert rules' own minimum before an error rate or p99 is judged

METRICS = (
    ("predictions", "Predictions"),
    ("error_rate", "Error rate"),
    ("p50", "Latency p50"),
    ("p95", "Latency p95"),
    ("p99", "Latency p99"),
    ("accuracy", "Accuracy on ground truth"),
    ("drift", "Drift (worst feature PSI)"),
)


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    if metric == "predictions":
        return f"{int(value):,}"
    if metric == "error_rate":
        return f"{value:.2%}"
    if metric in ("p50", "p95", "p99"):
        return f"{value:.1f} ms"
    if metric == "drift":
        return f"{value:.3f}"
    return f"{value:.3f}"


def _figures(model: Any, environment: str, version: int, start: dt.datetime, end: dt.datetime,
             thresholds: dict[str, Any]) -> dict[str, Any]:
    granularity = granularity_for(end - start)
    rows = [r for r in rollups(model.name, environment, granularity, bucket_start(start, granularity), end,
                               roles=ONLINE_ROLES) if r.version == version]
    merged = _merge(rows)
    count, data = merged["count"], merged["data"]
    spec = version_spec(model.name, version)
    latency = _latency(data)
    truth = accuracy_metrics(data.get("truth"), spec.task)
    worst = None
    if spec.features:
        worst = drift_report(spec, data, thresholds)["drift"]["worst"]
    roles = sorted({r.role for r in rows})
    return {"predictions": count, "errors": merged["errors"], "error_rate": merged["errors"] / count if count else None,
            "p50": latency["p50"], "p95": latency["p95"], "p99": latency["p99"],
            "accuracy": truth.get("accuracy", truth.get("mae")), "accuracy_kind": "mae" if "mae" in truth else
            "accuracy", "labelled": truth.get("labelled", 0), "drift": worst, "roles": roles}


# Figures judged against a threshold of the model's monitoring settings: (its name, how the limit reads).
_CEILINGS: dict[str, tuple[str, Any]] = {
    "error_rate": ("error_rate_max", lambda limit: f"≤ {limit:.1%}"),
    "p99": ("latency_p99_ms", lambda limit: f"≤ {limit:g} ms"),
}


def _judge(metric: str, figures: dict[str, Any], thresholds: dict[str, Any], champion: dict[str, Any] | None,
           accuracy_floor: float | None) -> tuple[str, str]:
    """(status, threshold text) of one figure: ``pass``, ``warn`` or ``insufficient`` (too little data to judge)."""
    value, count = figures.get(metric), figures["predictions"]
    if metric == "predictions":
        return ("pass" if count >= MIN_ROWS_FOR_RATES else "insufficient"), f"≥ {MIN_ROWS_FOR_RATES} to judge"
    if metric in _CEILINGS:
        name, shown = _CEILINGS[metric]
        limit = thresholds.get(name)
        text = shown(float(limit)) if limit is not None else "none set"
        if value is None or count < MIN_ROWS_FOR_RATES or limit is None:
            return "insufficient", text
        return ("pass" if value <= float(limit) else "warn"), text
    if metric in ("p50", "p95"):
        reference = (champion or {}).get(metric)
        text = f"≤ champion's + {LATENCY_SLACK:.0%}"
        if value is None or count < MIN_ROWS_FOR_RATES or reference is None:
            return "insufficient", text
        return ("pass" if value <= reference * (1 + LATENCY_SLACK) else "warn"), text
    if metric == "accuracy":
        minimum = int(thresholds["min_labelled"])
        if figures["accuracy_kind"] == "mae":
            text = "≤ champion's MAE"
            reference = (champion or {}).get("accuracy")
            if value is None or figures["labelled"] < minimum or reference is None:
                return "insufficient", text
            return ("pass" if value <= reference else "warn"), text
        text = f"≥ {accuracy_floor:.3f}" if accuracy_floor is not None else "no floor set"
        if value is None or figures["labelled"] < minimum or accuracy_floor is None:
            return "insufficient", text + f" ({minimum} labelled to judge)"
        return ("pass" if value >= accuracy_floor else "warn"), text
    # drift
    text = f"< {float(thresholds['psi_warning']):g} (alert at {float(thresholds['psi_alert']):g})"
    if value is None:
        return "insufficient", text + f" ({int(thresholds['min_rows'])} rows to judge)"
    return ("pass" if value < float(thresholds["psi_warning"]) else "warn"), text


def live_evidence(*, promotion: Any, window: str = "24h", now: dt.datetime | None = None) -> dict[str, Any]:
    """The candidate in every environment other than the target where it has served, and the target's champion,
    over ``window`` (one of ``EVIDENCE_WINDOWS``); each figure with its threshold and pass/warn."""
    if window not in EVIDENCE_WINDOWS:
        raise ValueError(f"window is one of {', '.join(EVIDENCE_WINDOWS)}.")
    end = now or timezone.now()
    start = end - RANGES[window]
    model, candidate, target = promotion.model, promotion.version, promotion.target
    thresholds = thresholds_for(model)
    baseline = promotion_baseline(promotion)
    champion = baseline.version if baseline is not None else None

    def served(version: Any) -> set[str]:
        return set(ServingInterval.objects.filter(version=version, role__in=ONLINE_ROLES).values_list(
            "environment", flat=True))

    # Wherever either has served (dev counts for stage): the candidate beside the version it would replace.
    candidate_envs = served(candidate) - {target}
    baseline_envs = served(champion) if champion is not None else set()
    environments = sorted(candidate_envs | baseline_envs, key=ORDER.index)

    floor = accuracy_floor(thresholds, champion, candidate)

    columns: list[dict[str, Any]] = []
    for env in environments:
        if env in candidate_envs:
            columns.append({"key": f"candidate-{env}", "who": "candidate", "version": candidate.number,
                            "environment": env, "label": f"Candidate v{candidate.number} in {env}",
                            "figures": _figures(model, env, candidate.number, start, end, thresholds)})
        if champion is not None and env in baseline_envs:
            label = (f"Champion v{champion.number} in {env}" if env == target and baseline is not None
                     and baseline.environment == target else f"v{champion.number} (it replaces) in {env}")
            columns.append({"key": f"champion-{env}", "who": "champion", "version": champion.number,
                            "environment": env, "label": label,
                            "figures": _figures(model, env, champion.number, start, end, thresholds)})
    by_env = {c["environment"]: c["figures"] for c in columns if c["who"] == "champion"}
    champion_figures = by_env.get(target) or (by_env.get(baseline.environment) if baseline is not None else None)
    served_list = sorted(candidate_envs, key=ORDER.index)

    rows: list[dict[str, Any]] = []
    for metric, label in METRICS:
        cells = []
        threshold_text = ""
        for column in columns:
            figures = column["figures"]
            # The replaced version in the same environment when it has figures there, else where it serves.
            same = by_env.get(column["environment"])
            reference = same if same and same["predictions"] else champion_figures
            status, threshold_text = _judge(metric, figures, thresholds,
                                            reference if column["who"] == "candidate" else None, floor)
            if column["who"] == "champion" and metric in ("p50", "p95"):
                status = "reference"
            if column["who"] == "champion" and metric == "accuracy" and figures["accuracy_kind"] == "mae":
                status = "reference"
            value = figures.get(metric)
            cells.append({"column": column["key"], "value": value, "display": _fmt(metric, value),
                          "status": status})
        if metric == "accuracy" and columns and columns[0]["figures"]["accuracy_kind"] == "mae":
            label = "MAE on ground truth"
        rows.append({"metric": metric, "label": label, "threshold": threshold_text, "cells": cells})

    return {
        "window": window, "windows": list(EVIDENCE_WINDOWS), "from": start.isoformat(), "to": end.isoformat(),
        "period": f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC",
        "target": target, "candidate_version": candidate.number,
        "champion_version": champion.number if champion is not None else None,
        "columns": [{k: v for k, v in c.items() if k != "figures"} | {
            "predictions": c["figures"]["predictions"], "labelled": c["figures"]["labelled"],
            "roles": c["figures"]["roles"]} for c in columns],
        "rows": rows,
        "warnings": sum(1 for r in rows for c in r["cells"] if c["status"] == "warn"),
        "served_elsewhere": bool(served_list),
        "baseline": ({"version": baseline.version.number, "environment": baseline.environment, "why": baseline.why,
                      "label": baseline.label} if baseline is not None else None),
    }
