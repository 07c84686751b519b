"""What the monitoring pages, the API and the alert rules read: a time range of rollups, merged.

Nothing here reads the prediction log itself, so a model with a billion logged predictions costs what one with a
thousand does: the number of buckets in the range (at most a few hundred, by ``granularity_for``).
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from typing import Any

import numpy as np
from django.utils import timezone

from monitoring import drift
from monitoring.additive import add
from monitoring.models import Alert, AlertStatus, Granularity, MonitoringSettings, Rollup
from monitoring.rollups import (LATENCY_EDGES_MS, OTHER, VersionSpec, bucket_start, percentile, rollups,
                                version_spec)
from portal.permissions import get_object_for_user, scope_to_teams
from registry.models import EnvironmentState, ServingInterval

ONLINE_ROLES = ("champion", "canary")
# What the monitoring page adds up: live answers, and the predictions edge devices uploaded (registry.edge), whose
# rows the roles table still sets apart; promotion evidence and alerts stay on the portal's own traffic.
MONITORED_ROLES = (*ONLINE_ROLES, "edge")
RANGES = {"1h": dt.timedelta(hours=1), "6h": dt.timedelta(hours=6), "24h": dt.timedelta(hours=24),
          "7d": dt.timedelta(days=7), "30d": dt.timedelta(days=30), "90d": dt.timedelta(days=90)}
MAX_RANGE = dt.timedelta(days=400)
STEP: dict[str, dt.timedelta] = {Granularity.MINUTE: dt.timedelta(minutes=1), Granularity.HOUR: dt.timedelta(hours=1),
        Granularity.DAY: dt.timedelta(days=1)}


def granularity_for(span: dt.timedelta) -> str:
    if span <= dt.timedelta(hours=6):
        return Granularity.MINUTE
    if span <= dt.timedelta(days=7):
        return Granularity.HOUR
    return Granularity.DAY


def thresholds_for(model: Any) -> dict[str, Any]:
    row = MonitoringSettings.objects.filter(model=model).first()
    return {**drift.DEFAULT_THRESHOLDS, **(row.thresholds if row else {})}


def _empty() -> dict[str, Any]:
    return {"count": 0, "errors": 0, "labelled": 0, "data": {}}


def _merge(rows: list[Rollup]) -> dict[str, Any]:
    total = _empty()
    for r in rows:
        total = add(total, {"count": r.count, "errors": r.errors, "labelled": r.labelled, "data": r.data})
    return total


def accuracy_metrics(truth: dict[str, Any] | None, task: str) -> dict[str, Any]:
    """Accuracy, precision, recall and F1 (binary: of the positive class; else macro) from confusion counts, or MAE,
    RMSE and R² from regression sums. ROC AUC needs logged probabilities, which the serving path does not log."""
    if not truth or not truth.get("n"):
        return {"labelled": 0}
    n = truth["n"]
    reg = truth.get("reg") or [0, 0.0, 0.0, 0.0, 0.0]
    if task == "regression" or (task == "unknown" and reg[0] == n and len(truth.get("confusion") or {}) > 20):
        m = reg[0]
        if not m:
            return {"labelled": n}
        ss_tot = reg[4] - reg[3] ** 2 / m
        return {"labelled": n, "task": "regression", "mae": reg[1] / m, "rmse": math.sqrt(reg[2] / m),
                "r2": (1 - reg[2] / ss_tot) if ss_tot > 0 else None}
    import orjson

    pairs: dict[tuple[str, str], int] = {}
    for key, count in (truth.get("confusion") or {}).items():
        if key == OTHER:
            continue
        predicted, actual = orjson.loads(key)
        pairs[(predicted, actual)] = count
    labels = sorted({p for p, _ in pairs} | {a for _, a in pairs})
    positive = next((c for c in ("1", "true", "yes") if c in labels), None) if len(labels) <= 2 else None

    def prf(label: str) -> tuple[float, float, float]:
        tp = pairs.get((label, label), 0)
        fp = sum(c for (p, a), c in pairs.items() if p == label and a != label)
        fn = sum(c for (p, a), c in pairs.items() if a == label and p != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    if positive is not None:
        precision, recall, f1 = prf(positive)
        averaging = f"binary (positive class {positive})"
    else:
        scores = [prf(label) for label in labels] or [(0.0, 0.0, 0.0)]
        precision, recall, f1 = (sum(s[i] for s in scores) / len(scores) for i in range(3))
        averaging = "macro"
    return {"labelled": n, "task": "classification", "accuracy": truth.get("correct", 0) / n, "precision": precision,
            "recall": recall, "f1": f1, "averaging": averaging, "roc_auc": None,
            "roc_auc_note": "needs predicted probabilities, which are not logged"}


def _latency(data: dict[str, Any]) -> dict[str, float | None]:
    hist = data.get("latency") or []
    return {"p50": percentile(hist, 0.5), "p95": percentile(hist, 0.95), "p99": percentile(hist, 0.99)}


def _axis(start: dt.datetime, end: dt.datetime, granularity: str) -> list[dt.datetime]:
    step, t, out = STEP[granularity], bucket_start(start, granularity), []
    while t < end:
        out.append(t)
        t += step
    return out


def _feature_profiles(spec: VersionSpec) -> dict[str, dict[str, Any]]:
    features = spec.reference.get("features") or {}
    return {f.name: features[f.name] for f in spec.features if f.name in features}


HEATMAP_COLUMNS = 30


def _heatmap(per_bucket: dict[dt.datetime, dict[str, Any]], axis: list[dt.datetime], profiles: dict[str, Any],
             thresholds: dict[str, Any]) -> dict[str, Any]:
    """PSI per feature (rows) and time cell (columns). Buckets are merged into at most ``HEATMAP_COLUMNS`` cells so
    that a cell holds enough predictions to judge; a cell needs ``max(20, min_rows // 5)`` of them. Vectorised per
    feature over all cells."""
    names = sorted(profiles)
    per_cell = max(1, math.ceil(len(axis) / HEATMAP_COLUMNS))
    cells = [axis[i:i + per_cell] for i in range(0, len(axis), per_cell)]
    z: list[list[float | None]] = []
    min_rows = max(20, int(thresholds["min_rows"]) // 5)
    for name in names:
        profile = profiles[name]
        ref_labels, ref, _cur, _missing = drift.aligned(profile, None)
        matrix = np.zeros((len(cells), len(ref_labels)))
        for j, cell in enumerate(cells):
            for t in cell:
                current = ((per_bucket.get(t) or {}).get("features") or {}).get(name)
                if current is not None:
                    _labels, _ref, cur, _m = drift.aligned(profile, current)
                    width = min(len(cur), len(ref_labels))
                    matrix[j, :width] += cur[:width]
        totals = matrix.sum(axis=1)
        p = ref / ref.sum() if ref.sum() else ref
        q = matrix / np.maximum(totals[:, None], 1)
        p_, q_ = np.where(p == 0, drift.EPSILON, p)[None, :], np.where(q == 0, drift.EPSILON, q)
        values = np.sum((q_ - p_) * np.log(q_ / p_), axis=1)
        z.append([round(float(v), 4) if totals[j] >= min_rows else None for j, v in enumerate(values)])
    return {"time": [cell[0].isoformat() for cell in cells], "features": names, "psi": z, "min_rows": min_rows}


def monitoring_summary(*, model: Any, environment: str, start: dt.datetime, end: dt.datetime,
                       version: int | None = None) -> dict[str, Any]:
    """Tiles, series, drift and heatmap of one version in ``environment`` over the range: ``version``, or by default
    the one serving now (the champion; with nothing serving, the version with the most predictions in the range).
    Figures of different versions are never added together; ``versions`` lists every version that served here in
    the range (and what serves now), for the page's switcher; ``roles`` sets the sides of a canary or shadow apart."""
    span = end - start
    granularity = granularity_for(span)
    axis = _axis(start, end, granularity)
    rows = rollups(model.name, environment, granularity, bucket_start(start, granularity), end)
    thresholds = thresholds_for(model)
    state = (EnvironmentState.objects.select_related("champion__version", "challenger__version")
             .filter(model=model, environment=environment).first())
    champion = state.champion.version.number if state and state.champion else None
    challenger = state.challenger.version.number if state and state.challenger else None
    versions_seen: dict[int, int] = defaultdict(int)
    for r in rows:
        if r.role in MONITORED_ROLES:
            versions_seen[r.version] += r.count
    if version is None:
        version = champion if champion is not None else (max(versions_seen, key=lambda v: versions_seen[v])
                                                         if versions_seen else None)
    drift_version = version
    online = [r for r in rows if r.role in MONITORED_ROLES and r.version == version]
    now_serving = {n: role for n, role in ((champion, "champion"), (challenger, state.mode if state else ""))
                   if n is not None}
    versions = [{"version": n, "serving": now_serving.get(n, ""), "predictions": versions_seen.get(n, 0)}
                for n in sorted(set(versions_seen) | set(now_serving), key=lambda n: (
                    n not in now_serving, n != champion, -n))]

    by_bucket: dict[dt.datetime, list[Rollup]] = defaultdict(list)
    batch_by_bucket: dict[dt.datetime, int] = defaultdict(int)
    for r in rows:
        if r.version != version:
            continue
        if r.role in MONITORED_ROLES:
            by_bucket[r.start].append(r)
        elif r.role == "batch":
            batch_by_bucket[r.start] += r.count
    spec = version_spec(model.name, drift_version) if drift_version is not None else None
    task = spec.task if spec else "unknown"
    seconds = STEP[granularity].total_seconds()
    series: dict[str, list[Any]] = {k: [] for k in ("predictions", "errors", "error_rate", "throughput", "p50", "p95",
                                                     "p99", "accuracy", "labelled_share", "batch")}
    drift_buckets: dict[dt.datetime, dict[str, Any]] = {}
    for t in axis:
        merged = _merge(by_bucket.get(t, []))
        count, data = merged["count"], merged["data"]
        series["predictions"].append(count)
        series["errors"].append(merged["errors"])
        series["error_rate"].append(merged["errors"] / count if count else None)
        series["throughput"].append(round(count / seconds, 4))
        for key, value in _latency(data).items():
            series[key].append(round(value, 3) if value is not None else None)
        metrics = accuracy_metrics(data.get("truth"), task)
        series["accuracy"].append(metrics.get("accuracy", metrics.get("mae")))
        series["labelled_share"].append(merged["labelled"] / count if count else None)
        series["batch"].append(batch_by_bucket.get(t, 0))
        if drift_version is not None:
            drift_buckets[t] = _merge([r for r in by_bucket.get(t, []) if r.version == drift_version])["data"]

    window = _merge(online)
    # Throughput over the part of the range that had traffic: a deployment that began serving ten minutes ago is
    # not averaged over the 24 hours before it existed (which read "0.00/s").
    first = min((r.start for r in online), default=None)
    active = (end - max(start, first)).total_seconds() if first is not None else span.total_seconds()
    result: dict[str, Any] = {
        "model": model.name, "environment": environment, "from": start.isoformat(), "to": end.isoformat(),
        "granularity": granularity, "thresholds": thresholds,
        "serving": {"champion": champion, "challenger": challenger, "mode": state.mode if state else None,
                    "challenger_percent": state.challenger_percent if state else 0},
        "version": version, "versions": versions,
        "totals": {"predictions": window["count"], "errors": window["errors"],
                   "error_rate": window["errors"] / window["count"] if window["count"] else None,
                   "throughput_per_s": window["count"] / max(active, 1),
                   "throughput_per_min": 60 * window["count"] / max(active, 1),
                   "latency_ms": _latency(window["data"]),
                   "batch_predictions": sum(r.count for r in rows if r.role == "batch" and r.version == version)},
        "accuracy": {**accuracy_metrics(window["data"].get("truth"), task),
                     "labelled_share": window["labelled"] / window["count"] if window["count"] else None,
                     "task": task},
        "time": [t.isoformat() for t in axis],
        "series": series,
        "drift": None, "heatmap": None, "distributions": {}, "prediction_distribution": None, "roles": {},
    }
    if spec is not None and drift_version is not None:
        result.update(drift_report(spec, _merge([r for r in online if r.version == drift_version])["data"],
                                   thresholds))
        profiles = _feature_profiles(spec)
        heatmap = _heatmap(drift_buckets, axis, profiles, thresholds)
        # A heatmap with no cell to judge is no heatmap: the page says so instead of drawing an empty time axis.
        result["heatmap"] = heatmap if any(v is not None for row in heatmap["psi"] for v in row) else None
        if not window["count"]:  # nothing to compare with the reference: no figure computed from zero rows
            result.update({"drift": None, "distributions": {}, "prediction_distribution": None})
    result["roles"] = roles_report(rows, task)
    result["alerts"] = [alert_json(a) for a in Alert.objects.filter(
        model=model, environment=environment).exclude(status=AlertStatus.RESOLVED).order_by("-opened_at")[:50]]
    return result


def drift_report(spec: VersionSpec, data: dict[str, Any], thresholds: dict[str, Any]) -> dict[str, Any]:
    """Per-feature and prediction drift of ``data`` (merged rollup data of one version) against its reference."""
    profiles = _feature_profiles(spec)
    current = data.get("features") or {}
    features = [drift.feature_drift(name, profiles[name], current.get(name), thresholds) for name in sorted(profiles)]
    distributions = {name: drift.distribution(profiles[name], current.get(name)) for name in sorted(profiles)}
    prediction = None
    predictions = data.get("predictions") or {}
    if spec.target is not None:
        target_profile = spec.reference["features"][spec.target.name]
        observed = predictions.get("bins") if target_profile.get("kind") == "numeric" else predictions.get("cats")
        prediction = {**drift.feature_drift(spec.target.name, target_profile, observed, thresholds),
                      "distribution": drift.distribution(target_profile, observed)}
    return {
        "drift": {"version": spec.version, "features": features, "prediction": prediction,
                  "worst": max((f["psi"] for f in features if f["psi"] is not None), default=None)},
        "distributions": distributions,
        "prediction_distribution": prediction_distribution(spec, predictions),
    }


def prediction_distribution(spec: VersionSpec, predictions: dict[str, Any]) -> dict[str, Any] | None:
    """What the model answered, for the page's chart. A classifier's answers by class (``by: "class"``), with the
    reference's share of each class where its target column names them; a regressor's on the target's reference
    bins (``by: "bin"``) when there is a target column, else by value."""
    labels = {k: v for k, v in (predictions.get("labels") or {}).items() if v}
    total = sum(labels.values())
    if spec.task != "regression" and total:
        reference = drift.class_shares(spec.reference["features"][spec.target.name]) if spec.target else None
        names = sorted(set(labels) | set(reference or {}), key=_class_order)
        return {"by": "class", "labels": names, "current": [labels.get(n, 0) / total for n in names],
                "reference": [(reference or {}).get(n, 0.0) for n in names] if reference else None,
                "reference_name": spec.target.name if spec.target and reference else None}
    if spec.target is not None and spec.target.kind == "numeric" and predictions.get("bins"):
        dist = drift.distribution(spec.reference["features"][spec.target.name], predictions.get("bins"))
        if sum(dist["current"]):
            return {"by": "bin", **dist, "reference_name": spec.target.name}
    if total:
        return {"by": "value", "labels": list(labels), "current": [c / total for c in labels.values()],
                "reference": None, "reference_name": None}
    return None


def _class_order(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def roles_report(rows: list[Rollup], task: str) -> dict[str, Any]:
    """Champion against challenger (canary or shadow) over the range, side by side."""
    out: dict[str, Any] = {}
    by_role: dict[tuple[str, int], list[Rollup]] = defaultdict(list)
    for r in rows:
        if r.role != "batch":
            by_role[(r.role, r.version)].append(r)
    for (role, version), group in sorted(by_role.items()):
        merged = _merge(group)
        labels = (merged["data"].get("predictions") or {}).get("labels") or {}
        total = sum(labels.values())
        out[f"{role} v{version}"] = {
            "role": role, "version": version, "predictions": merged["count"],
            "error_rate": merged["errors"] / merged["count"] if merged["count"] else None,
            "latency_ms": _latency(merged["data"]),
            "accuracy": accuracy_metrics(merged["data"].get("truth"), task),
            "prediction_distribution": {k: v / total for k, v in sorted(labels.items())} if total else {},
        }
    return out


def alert_get(*, user: Any, uid: str) -> Alert:
    """An alert of the user's teams that they may acknowledge or resolve (404 outside them, 403 without the role)."""
    return get_object_for_user(user, Alert.objects.select_related("model__team"), action="manage_alerts",
                               uid=uid)


def alert_json(alert: Alert) -> dict[str, Any]:
    return {"id": str(alert.uid), "kind": alert.kind, "subject": alert.subject, "severity": alert.severity,
            "status": alert.status, "value": alert.value, "threshold": alert.threshold, "message": alert.message,
            "opened_at": alert.opened_at.isoformat(), "last_seen_at": alert.last_seen_at.isoformat(),
            "acknowledged_by": alert.acknowledged_by.get_username() if alert.acknowledged_by else None,
            "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None}


def version_param(model: Any, raw: str | None) -> int | None:
    """The ``version`` a monitoring page or API call asks for (None: the one serving now). ValueError names the
    versions there are."""
    if raw in (None, ""):
        return None
    numbers = list(model.versions.order_by("number").values_list("number", flat=True))
    if not str(raw).isdigit() or int(str(raw)) not in numbers:
        raise ValueError(f"version is one of {', '.join(str(n) for n in numbers) or 'none yet'}"
                         " (or leave it out for the one serving now).")
    return int(str(raw))


def parse_range(params: Any, *, now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """``range=24h`` (a preset) or ``from``/``to`` (ISO 8601; ``to`` defaults to now). Raises ValueError with a
    message a person can act on."""
    now = now or timezone.now()
    preset = params.get("range")
    raw_from, raw_to = params.get("from"), params.get("to")
    if raw_from or raw_to:
        try:
            end = _parse_time(raw_to) if raw_to else now
            start = _parse_time(raw_from) if raw_from else end - RANGES["24h"]
        except ValueError:
            raise ValueError("from and to are ISO 8601 times, e.g. 2026-11-20T08:00:00Z.") from None
    else:
        if preset and preset not in RANGES:
            raise ValueError(f"range is one of {', '.join(RANGES)}.")
        end, start = now, now - RANGES[preset or "24h"]
    if start >= end:
        raise ValueError("from must be before to.")
    if end - start > MAX_RANGE:
        raise ValueError("A range covers at most 400 days.")
    return start, end


def default_range(*, model: Any, environment: str, now: dt.datetime | None = None) -> str:
    """The preset a page opens on when none is asked for: one that fits the data. For a model serving here for
    less than a day, the last hour while it has traffic in it; otherwise the shortest preset from 24 hours up that
    holds the latest traffic (the 24 hours when there is none)."""
    now = now or timezone.now()
    began = (ServingInterval.objects.filter(model=model, environment=environment)
             .order_by("started_at").values_list("started_at", flat=True).first())
    latest = (Rollup.objects.filter(model_name=model.name, environment=environment, role__in=ONLINE_ROLES,
                                    granularity=Granularity.HOUR, start__gte=now - RANGES["90d"])
              .order_by("-start").values_list("start", flat=True).first())
    young = began is not None and now - began < dt.timedelta(days=1)
    if latest is None:
        return "1h" if young else "24h"
    for key in (("1h", "6h", "24h") if young else ("24h", "7d", "30d", "90d")):
        since = now - RANGES[key]
        if key.endswith("h"):  # minute precision: an hour bucket begun 50 minutes before the range is not in it
            if Rollup.objects.filter(model_name=model.name, environment=environment, role__in=ONLINE_ROLES,
                                     granularity=Granularity.MINUTE, start__gte=since).exists():
                return key
        elif latest >= bucket_start(since, Granularity.HOUR):
            return key
    return "24h"


def _parse_time(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def portfolio(*, user: Any, window: dt.timedelta = dt.timedelta(hours=1)) -> list[dict[str, Any]]:
    """Every environment serving a model the user may see, with the serving (champion) version's figures over the
    last hour and a traffic light: red with an open alert, amber with an open warning, grey without predictions of
    that version in the last hour, green otherwise."""
    states_qs = scope_to_teams(EnvironmentState.objects.select_related("model__team", "champion__version",
                                                                     "challenger__version")
                            .filter(champion__isnull=False), user)
    states = list(states_qs.order_by("model__name", "environment"))
    now = timezone.now()
    since = bucket_start(now - window, Granularity.MINUTE)
    names = {s.model.name for s in states}
    traffic: dict[tuple[str, str], dict[str, Any]] = defaultdict(_empty)
    serving = {(s.model.name, s.environment): s.champion.version.number for s in states if s.champion}
    for r in Rollup.objects.filter(model_name__in=names, granularity=Granularity.MINUTE, start__gte=since,
                                   role__in=ONLINE_ROLES):
        key = (r.model_name, r.environment)
        if serving.get(key) != r.version:  # what serves now, not what served before it in the same hour
            continue
        traffic[key] = add(traffic[key], {"count": r.count, "errors": r.errors, "labelled": r.labelled,
                                          "data": {"latency": r.data.get("latency") or [0] * (len(LATENCY_EDGES_MS) + 1)}})
    open_alerts: dict[tuple[int, str], list[Alert]] = defaultdict(list)
    for alert in Alert.objects.filter(model__in=[s.model for s in states]).exclude(status=AlertStatus.RESOLVED):
        open_alerts[(alert.model_id, alert.environment)].append(alert)
    out = []
    for s in states:
        t = traffic.get((s.model.name, s.environment)) or _empty()
        alerts = open_alerts.get((s.model_id, s.environment), [])
        if any(a.severity == "alert" for a in alerts):
            light = "red"
        elif alerts:
            light = "amber"
        elif not t["count"]:
            light = "grey"
        else:
            light = "green"
        out.append({"model": s.model.name, "team": s.model.team.slug, "environment": s.environment,
                    "champion": s.champion.version.number if s.champion else None,
                    "challenger": s.challenger.version.number if s.challenger else None, "mode": s.mode,
                    "predictions": t["count"], "error_rate": t["errors"] / t["count"] if t["count"] else None,
                    "p99": percentile(t["data"].get("latency") or [], 0.99), "alerts": alerts, "light": light})
    return out
