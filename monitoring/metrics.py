"""Prometheus ``/metrics``, read from the rollups (so every web worker reports the same numbers, and scraping costs
the same at any traffic).

Series, in base units, labelled by model and environment only (plus role, severity or feature where they say so):

- ``portal_predictions_total`` and ``portal_prediction_errors_total`` (counters, by role);
- ``portal_prediction_latency_seconds`` (histogram of online predictions; its buckets are every tenth edge of the
  rollups' latency bins, so they are exact sums of them);
- ``portal_feature_drift_psi`` and ``portal_prediction_drift_psi`` (gauges, over each model's alert window);
- ``portal_alerts_open`` (gauge, by severity);
- ingestion lag, read live from the buffers (``monitoring/ingest.py``), labelled by ``buffer`` (``stream``,
  ``outbox``) where they say so: ``portal_prediction_ingest_pending`` (records not yet in the log),
  ``portal_prediction_ingest_oldest_age_seconds`` (the oldest of them; 0 when nothing waits),
  ``portal_prediction_ingest_in_flight`` (read by a flusher, not yet committed),
  ``portal_prediction_ingest_fill_ratio`` (the fullest stream key over its MAXLEN: trimming starts at 1),
  ``portal_prediction_ingest_lost`` (counter: records trimmed before a flusher wrote them) and
  ``portal_prediction_ingest_redis_up``.

The counters are sums of the day rollups, which are never purged; they lag the requests by the rollup interval.
Access: a bearer token (``PORTAL_METRICS_TOKEN``) or a client address inside ``PORTAL_METRICS_ALLOW``.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.db.models import Count, Sum
from django.utils import timezone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from monitoring.additive import add
from monitoring.ingest import ingest_lag
from monitoring.models import Alert, AlertStatus, Granularity, Rollup
from monitoring.rollups import LATENCY_EDGES_MS, bucket_start, version_spec
from monitoring.selectors import ONLINE_ROLES, _merge, drift_report, thresholds_for
from registry.models import EnvironmentState

PROMETHEUS_EDGE_INDEXES = list(range(0, len(LATENCY_EDGES_MS), 10))


def allowed(request: Any) -> bool:
    token = settings.PORTAL_METRICS_TOKEN
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if token and header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in settings.PORTAL_METRICS_ALLOW)


class RollupCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        totals = CounterMetricFamily("portal_predictions", "Predictions logged", labels=["model", "environment",
                                                                                          "role"])
        errors = CounterMetricFamily("portal_prediction_errors", "Predictions that failed",
                                     labels=["model", "environment", "role"])
        for row in (Rollup.objects.filter(granularity=Granularity.DAY)
                    .values("model_name", "environment", "role").annotate(n=Sum("count"), e=Sum("errors"))
                    .order_by("model_name", "environment", "role")):
            labels = [row["model_name"], row["environment"], row["role"]]
            totals.add_metric(labels, row["n"] or 0)
            errors.add_metric(labels, row["e"] or 0)
        yield totals
        yield errors
        yield self._latency()
        yield from self._drift()
        alerts = GaugeMetricFamily("portal_alerts_open", "Alerts firing or acknowledged",
                                   labels=["model", "environment", "severity"])
        for open_alert in (Alert.objects.exclude(status=AlertStatus.RESOLVED)
                           .values("model__name", "environment", "severity").annotate(n=Count("id"))
                           .order_by("model__name", "environment", "severity")):
            alerts.add_metric([open_alert["model__name"], open_alert["environment"], open_alert["severity"]],
                              open_alert["n"])
        yield alerts
        yield from _ingest()

    def _latency(self) -> Metric:
        histogram = HistogramMetricFamily("portal_prediction_latency_seconds", "Latency of online predictions",
                                          labels=["model", "environment"])
        merged: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
        for r in Rollup.objects.filter(granularity=Granularity.DAY, role__in=ONLINE_ROLES).only(
                "model_name", "environment", "data"):
            key = (r.model_name, r.environment)
            merged[key] = add(merged[key], {"latency": r.data.get("latency") or [],
                                            "latency_sum": r.data.get("latency_sum", 0.0)})
        for (model, environment), data in sorted(merged.items()):
            hist = data.get("latency") or []
            buckets, cumulative = [], 0
            for i, edge_index in enumerate(PROMETHEUS_EDGE_INDEXES):
                lo = PROMETHEUS_EDGE_INDEXES[i - 1] + 1 if i else 0
                cumulative += sum(hist[lo:edge_index + 1])
                buckets.append((f"{LATENCY_EDGES_MS[edge_index] / 1000:.6g}", cumulative))
            buckets.append(("+Inf", sum(hist)))
            histogram.add_metric([model, environment], buckets, sum_value=data.get("latency_sum", 0.0) / 1000)
        return histogram

    def _drift(self) -> Iterator[Metric]:
        features = GaugeMetricFamily("portal_feature_drift_psi", "PSI of each feature over the alert window",
                                     labels=["model", "environment", "feature"])
        predictions = GaugeMetricFamily("portal_prediction_drift_psi", "PSI of the predictions over the alert window",
                                        labels=["model", "environment"])
        now = timezone.now()
        for state in (EnvironmentState.objects.select_related("model", "champion__version")
                      .filter(champion__isnull=False).order_by("model__name", "environment")):
            thresholds = thresholds_for(state.model)
            start = bucket_start(now - dt.timedelta(minutes=int(thresholds["window_minutes"])), Granularity.MINUTE)
            assert state.champion is not None
            number = state.champion.version.number
            rows = list(Rollup.objects.filter(model_name=state.model.name, environment=state.environment,
                                              granularity=Granularity.MINUTE, start__gte=start, version=number,
                                              role__in=ONLINE_ROLES))
            if not rows:
                continue
            report = drift_report(version_spec(state.model.name, number), _merge(rows)["data"], thresholds)["drift"]
            for f in report["features"]:
                if f["psi"] is not None:
                    features.add_metric([state.model.name, state.environment, f["feature"]], f["psi"])
            if report["prediction"] and report["prediction"]["psi"] is not None:
                predictions.add_metric([state.model.name, state.environment], report["prediction"]["psi"])
        yield features
        yield predictions


def _ingest() -> Iterator[Metric]:
    lag = ingest_lag()
    pending = GaugeMetricFamily("portal_prediction_ingest_pending", "Prediction records not yet in the log",
                                labels=["buffer"])
    age = GaugeMetricFamily("portal_prediction_ingest_oldest_age_seconds",
                            "Age of the oldest prediction record not yet in the log (0: none)", labels=["buffer"])
    for name, buffer_lag in sorted(lag.buffers.items()):
        pending.add_metric([name], buffer_lag.pending)
        age.add_metric([name], buffer_lag.oldest_age_seconds or 0.0)
    yield pending
    yield age
    if lag.redis_up is None:
        return
    yield GaugeMetricFamily("portal_prediction_ingest_redis_up", "Whether the Redis buffer answered (1) or not (0)",
                            value=int(lag.redis_up))
    if lag.redis_up:
        yield GaugeMetricFamily("portal_prediction_ingest_in_flight",
                                "Stream records a flusher has read and not yet acknowledged", value=lag.in_flight)
        yield GaugeMetricFamily("portal_prediction_ingest_fill_ratio",
                                "The fullest stream key's length over its MAXLEN (XADD trims unflushed records at 1)",
                                value=lag.fill_ratio)
        yield CounterMetricFamily("portal_prediction_ingest_lost",
                                  "Prediction records trimmed from the streams before a flusher wrote them",
                                  value=lag.lost)


def render() -> bytes:
    from prometheus_client import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RollupCollector())
    return generate_latest(registry)
