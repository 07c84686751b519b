"""Alerts fire once and resolve, with email, a signed webhook and an audit event per state change; /metrics parses
with prometheus_client's parser and is closed to strangers; the API and pages answer per role."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from monitoring.alerts import evaluate_alerts
from monitoring.models import Alert, MonitoringSettings
from monitoring.rollups import rollup_dirty
from portal.models import AuditEvent, Team
from registry.models import ModelVersion
from tests.conftest import assert_error_shape
from tests.monitoring.conftest import reference_matrix

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def outside_world(settings: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Email into memory, sent at once; webhooks recorded instead of posted (the outside world is mocked)."""
    from portal import tasks as portal_tasks
    from portal import webhooks

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    monkeypatch.setattr(portal_tasks.send_email_task, "delay", lambda *a: portal_tasks.send_email_task(*a))
    posted: list[dict[str, Any]] = []

    def post_signed(url: str, secret: str, event: str, delivery_id: str, payload: dict[str, Any]) -> int:
        posted.append({"url": url, "event": event, "payload": payload})
        return 200

    monkeypatch.setattr(webhooks, "post_signed", post_signed)
    monkeypatch.setattr(portal_tasks.webhook_deliver_task, "delay",
                        lambda pk: webhooks.webhook_deliver(delivery_id=pk))
    from portal.models import TeamWebhook

    TeamWebhook.objects.create(team=Team.objects.get(slug="acme"), url="https://hooks.example.com/portal",
                               secret="s3cret-s3cret-s3cret", events=["alert.fired", "alert.resolved"], active=True)
    return posted


@pytest.fixture
def drifted(live: ModelVersion, log_rows: Callable[..., list[str]]) -> ModelVersion:
    """300 predictions in the last minutes whose inputs are three times the reference's."""
    _columns, X, y = reference_matrix()
    log_rows(X[:300] * 3.0, at=timezone.now() - dt.timedelta(minutes=5), outputs=y[:300].tolist())
    rollup_dirty()
    return live


def test_a_drift_alert_fires_once_then_resolves_when_the_condition_clears(
        drifted: ModelVersion, outside_world: list[dict[str, Any]], django_capture_on_commit_callbacks: Any) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        first = evaluate_alerts()
    assert first["fired"] > 0
    drift_alerts = Alert.objects.filter(kind="drift")
    assert drift_alerts.filter(severity="alert").exists()
    fired = AuditEvent.objects.filter(action="alert.fire").count()
    assert fired == first["fired"] == Alert.objects.count()
    assert len(mail.outbox) == fired and "dana@example.invalid" in mail.outbox[0].to
    assert [p["event"] for p in outside_world] == ["alert.fired"] * fired
    assert outside_world[0]["payload"]["model"] == "churn"

    for _ in range(3):  # a minute later, and later again: the same alerts, not new ones
        with django_capture_on_commit_callbacks(execute=True):
            again = evaluate_alerts()
        assert again["fired"] == 0 and again["updated"] == fired
    assert Alert.objects.count() == fired
    assert AuditEvent.objects.filter(action="alert.fire").count() == fired and len(mail.outbox) == fired

    # Two hours on, the window holds no traffic: every alert resolves itself, once.
    later = timezone.now() + dt.timedelta(hours=2)
    with django_capture_on_commit_callbacks(execute=True):
        done = evaluate_alerts(now=later)
    assert done["resolved"] == fired
    assert set(Alert.objects.values_list("status", flat=True)) == {"resolved"}
    assert AuditEvent.objects.filter(action="alert.resolve").count() == fired
    assert [p["event"] for p in outside_world].count("alert.resolved") == fired


def test_thresholds_per_model_change_what_fires(drifted: ModelVersion, personas: dict[str, Any],
                                                api_as: Callable[[Any], Any]) -> None:
    response = api_as(personas["ds"]).put("/api/v1/models/churn/monitoring-settings",
                                          {"thresholds": {"psi_warning": 50, "psi_alert": 100}}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["effective"]["psi_alert"] == 100
    assert AuditEvent.objects.filter(action="monitoring.settings_change").count() == 1
    evaluate_alerts()
    assert not Alert.objects.filter(kind="drift").exists()
    bad = api_as(personas["ds"]).put("/api/v1/models/churn/monitoring-settings",
                                     {"thresholds": {"psi_alert": "high"}}, format="json")
    assert "psi_alert must be a number" in assert_error_shape(bad, 400)["error"]["message"]
    unknown = api_as(personas["ds"]).put("/api/v1/models/churn/monitoring-settings",
                                         {"thresholds": {"psi_alrt": 0.3}}, format="json")
    assert "Unknown threshold 'psi_alrt'" in assert_error_shape(unknown, 400)["error"]["message"]
    assert MonitoringSettings.objects.get().thresholds == {"psi_warning": 50.0, "psi_alert": 100.0}


@pytest.mark.parametrize("who, code", [("ds", 200), ("approver1", 200), ("admin", 200), ("viewer", 403),
                                       ("compliance", 403), ("outsider", 404), (None, 401)])
def test_acknowledging_and_resolving_alerts_per_role(drifted: ModelVersion, personas: dict[str, Any],
                                                     api_as: Callable[[Any], Any], who: str | None,
                                                     code: int) -> None:
    evaluate_alerts()
    alert = Alert.objects.filter(kind="drift").first()
    assert alert is not None
    client = api_as(personas[who] if who else None)
    response = client.post(f"/api/v1/alerts/{alert.uid}/acknowledge", {"comment": "looking"}, format="json")
    assert response.status_code == code, response.content
    if code != 200:
        assert_error_shape(response, code)
        return
    assert response.json()["status"] == "acknowledged"
    assert_error_shape(client.post(f"/api/v1/alerts/{alert.uid}/acknowledge", {}, format="json"), 409)
    assert_error_shape(client.post(f"/api/v1/alerts/{alert.uid}/resolve", {}, format="json"), 400)
    resolved = client.post(f"/api/v1/alerts/{alert.uid}/resolve", {"resolution": "retrained on new data"},
                           format="json")
    assert resolved.json()["status"] == "resolved"
    actions = list(AuditEvent.objects.filter(target_id=str(alert.uid)).order_by("seq").values_list("action",
                                                                                                   flat=True))
    assert actions == ["alert.fire", "alert.acknowledge", "alert.resolve"]
    listing = client.get("/api/v1/alerts/?status=resolved").json()
    assert [a["id"] for a in listing["results"]] == [str(alert.uid)]


@pytest.mark.parametrize("who, code", [("ds", 200), ("viewer", 200), ("compliance", 200), ("approver1", 200),
                                       ("outsider", 404), (None, 401)])
def test_the_monitoring_api_per_role(drifted: ModelVersion, personas: dict[str, Any], api_as: Callable[[Any], Any],
                                     who: str | None, code: int) -> None:
    response = api_as(personas[who] if who else None).get("/api/v1/models/churn/environments/dev/monitoring?range=1h")
    assert response.status_code == code, response.content
    if code != 200:
        assert_error_shape(response, code)
        return
    body = response.json()
    assert body["totals"]["predictions"] == 300 and body["granularity"] == "minute"
    assert set(body["totals"]["latency_ms"]) == {"p50", "p95", "p99"}
    drifted_features = [f for f in body["drift"]["features"] if f["status"] == "alert"]
    assert len(drifted_features) > 20, "inputs three times the reference drift almost everywhere"
    assert body["accuracy"]["labelled"] == 0 and body["drift"]["version"] == 1
    assert len(body["heatmap"]["psi"]) == len(body["heatmap"]["features"])


def test_the_monitoring_api_refuses_bad_ranges(live: ModelVersion, personas: dict[str, Any],
                                               api_as: Callable[[Any], Any]) -> None:
    client = api_as(personas["ds"])
    base = "/api/v1/models/churn/environments/dev/monitoring"
    assert "ISO 8601" in assert_error_shape(client.get(base + "?from=yesterday"), 400)["error"]["message"]
    assert "before" in assert_error_shape(client.get(base + "?from=2026-11-20T10:00:00Z&to=2026-11-20T09:00:00Z"),
                                          400)["error"]["message"]
    assert "range is one of" in assert_error_shape(client.get(base + "?range=5y"), 400)["error"]["message"]
    assert_error_shape(client.get("/api/v1/models/churn/environments/qa/monitoring"), 400)
    assert_error_shape(client.get("/api/v1/models/nope/environments/dev/monitoring"), 404)


def test_metrics_parse_and_are_closed_to_strangers(drifted: ModelVersion, settings: Any) -> None:
    evaluate_alerts()
    rollup_dirty()
    response = Client().get("/metrics")  # the test client comes from 127.0.0.1: inside the default allowlist
    assert response.status_code == 200, response.content
    families = {f.name: f for f in text_string_to_metric_families(response.content.decode())}
    totals = {tuple(sorted(s.labels.items())): s.value for s in families["portal_predictions"].samples
              if s.name == "portal_predictions_total"}
    assert totals == {(("environment", "dev"), ("model", "churn"), ("role", "champion")): 300.0}
    latency = [s for s in families["portal_prediction_latency_seconds"].samples
               if s.name.endswith("_count")]
    assert latency and latency[0].value == 300
    psi = [s for s in families["portal_feature_drift_psi"].samples]
    assert len(psi) == 30 and all(s.labels["model"] == "churn" for s in psi)
    open_alerts = {s.labels["severity"]: s.value for s in families["portal_alerts_open"].samples}
    assert open_alerts.get("alert", 0) >= 1

    stranger = Client(REMOTE_ADDR="203.0.113.9").get("/metrics")
    assert stranger.status_code == 403 and b"PORTAL_METRICS_ALLOW" in stranger.content
    settings.PORTAL_METRICS_TOKEN = "scrape-token-0123456789"
    assert Client(REMOTE_ADDR="203.0.113.9", HTTP_AUTHORIZATION="Bearer scrape-token-0123456789").get(
        "/metrics").status_code == 200
    assert Client(REMOTE_ADDR="203.0.113.9", HTTP_AUTHORIZATION="Bearer wrong").get("/metrics").status_code == 403


@pytest.mark.parametrize("who, code", [("ds", 200), ("viewer", 200), ("compliance", 200), ("outsider", 404)])
def test_monitoring_pages_per_role(drifted: ModelVersion, personas: dict[str, Any], who: str, code: int) -> None:
    evaluate_alerts()
    client = Client()
    client.force_login(personas[who])
    page = client.get("/models/churn/environments/dev/monitoring?range=1h")
    assert page.status_code == code
    portfolio = client.get("/monitoring/")
    assert portfolio.status_code == 200
    if code == 200:
        text = page.content.decode()
        assert 'id="monitoring-data"' in text and "Drift over the range" in text
        # plotly's partial bundle of the three trace types the page draws, from our static files
        assert "/static/vendor/plotly/plotly-monitoring.min.js" in text and "plotly-cartesian" not in text
        assert ('data-testid="acknowledge"' in text) == (who == "ds"), "only roles that manage alerts see buttons"
        assert 'data-light="red"' in portfolio.content.decode()
    else:
        assert "churn" not in portfolio.content.decode()


def test_alert_buttons_are_enforced_on_the_server(drifted: ModelVersion, personas: dict[str, Any]) -> None:
    evaluate_alerts()
    alert = Alert.objects.filter(kind="drift").first()
    assert alert is not None
    viewer = Client()
    viewer.force_login(personas["viewer"])
    assert viewer.post(f"/alerts/{alert.uid}/acknowledge").status_code == 403
    assert viewer.post("/models/churn/environments/dev/monitoring/settings", {"thresholds": "{}"}).status_code == 403
    assert Client().get("/monitoring/").status_code == 302
    ds = Client()
    ds.force_login(personas["ds"])
    assert ds.post(f"/alerts/{alert.uid}/acknowledge").status_code == 302
    alert.refresh_from_db()
    assert alert.status == "acknowledged" and alert.acknowledged_by == personas["ds"]
    ds.post(f"/alerts/{alert.uid}/resolve", {"resolution": ""})
    alert.refresh_from_db()
    assert alert.status == "acknowledged", "a resolution needs a note"
    response = ds.post("/models/churn/environments/dev/monitoring/settings", {"thresholds": "{not json"}, follow=True)
    assert "not valid JSON" in response.content.decode()


def test_drift_alerts_have_hysteresis_on_steady_traffic(live: ModelVersion, log_rows: Callable[..., list[str]],
                                                        django_capture_on_commit_callbacks: Any) -> None:
    """Forty minutes of the same mildly shifted traffic, 25 rows a minute, judged every minute over a 5-minute
    window: its PSI wanders above and below the alert threshold (set at its median), so an alert that opened and
    closed on one threshold would flap. With hysteresis it opens once, stays open while traffic lasts, and resolves
    only after the PSI has stayed below the warning threshold for a whole window."""
    from monitoring.alerts import conditions

    _columns, X, _y = reference_matrix()
    rng = np.random.default_rng(7)
    start = timezone.now().replace(second=0, microsecond=0) - dt.timedelta(minutes=45)
    for minute in range(40):
        log_rows(X[rng.integers(0, len(X), 25)] * 1.15, at=start + dt.timedelta(minutes=minute, seconds=1))
    rollup_dirty()
    quiet = {"window_minutes": 5, "min_rows": 50, "error_rate_max": None, "latency_p99_ms": None}
    settings_row = MonitoringSettings.objects.create(model=live.model, thresholds={
        **quiet, "psi_warning": 0.0001, "psi_alert": 0.0001})
    times = [start + dt.timedelta(minutes=m) for m in range(6, 41)]
    psi = [next(c.value for c in conditions(live.model, "dev", now=t) if c.kind == "drift") for t in times]
    alert_at = float(np.median(psi))
    crossings = sum((a >= alert_at) != (b >= alert_at) for a, b in itertools.pairwise(psi))
    assert crossings >= 4, psi  # the traffic really does cross the alert threshold back and forth
    settings_row.thresholds = {**quiet, "psi_warning": round(min(psi) * 0.8, 6), "psi_alert": alert_at}
    settings_row.save()

    with django_capture_on_commit_callbacks(execute=True):
        for t in times:
            evaluate_alerts(now=t)
    drift_alerts = Alert.objects.filter(kind="drift")
    assert drift_alerts.count() == 1 and drift_alerts.get().status == "firing"
    for kind in ("drift", "prediction_drift"):  # each opened at most once (the predictions drift a little too)
        assert Alert.objects.filter(kind=kind).count() <= 1
    assert AuditEvent.objects.filter(action="alert.fire").count() == Alert.objects.count()
    assert not AuditEvent.objects.filter(action="alert.resolve").exists()

    end = times[-1]
    evaluate_alerts(now=end + dt.timedelta(minutes=4))  # under the warning threshold, but not for a window yet
    assert drift_alerts.get().status == "firing"
    evaluate_alerts(now=end + dt.timedelta(minutes=6))
    resolved = drift_alerts.get()
    assert resolved.status == "resolved" and "below the warning threshold for 5 min" in resolved.resolution


def test_a_cold_start_is_left_out_of_logged_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request of a web process to a sandboxed model waits for the host to start (seconds); the latency
    logged for it, which the rollups and the latency alert read, is the request's own time without that wait."""
    from registry.sandbox import hosts
    from registry.serving import views as serving_views

    hosts.cold_start_reset()
    hosts.cold_start_add(1.6)  # what ModelHost._request adds when the host started while the request waited
    record = serving_views._batch(name="churn", env="dev", role="champion", version=1, matrix=[[1.0]],
                                  predictions=[0], ids=["a" * 32], latency_ms=1612.0, subjects=None)
    assert record["latency_ms"] == pytest.approx(12.0)
    hosts.cold_start_reset()
    warm = serving_views._batch(name="churn", env="dev", role="champion", version=1, matrix=[[1.0]],
                                predictions=[0], ids=["b" * 32], latency_ms=9.5, subjects=None)
    assert warm["latency_ms"] == 9.5
