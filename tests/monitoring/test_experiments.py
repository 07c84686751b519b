"""A/B experiments through their services, API and pages: refusals a person can act on, verdicts from the rollups
(a win opens a promotion request carrying the experiment, a champion that holds or a guardrail breach stops the
challenger's traffic, a sample-ratio mismatch invalidates), waiting outcomes counted, everything audited in the
transaction that makes it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from monitoring.experiments import selectors, services
from monitoring.experiments.models import Experiment, ExperimentStatus, Verdict
from monitoring.feedback import feedback_receive
from monitoring.rollups import rollup_dirty
from portal.models import AuditEvent, TeamWebhook, WebhookDelivery
from registry.models import EnvironmentState, ModelVersion, PromotionRequest, ServingMode
from tests.conftest import assert_error_shape
from tests.monitoring.conftest import reference_matrix
from tests.registry.conftest import deploy_now

pytestmark = pytest.mark.django_db


@pytest.fixture
def canary(two_versions: list[ModelVersion], personas: dict[str, Any]) -> list[ModelVersion]:
    """v1 the champion of churn in dev, v2 its canary on 50 % of requests."""
    deploy_now(two_versions[0], personas["ds"])
    deploy_now(two_versions[1], personas["ds"], strategy="canary", traffic_percent=50)
    return two_versions


def labelled(log_rows: Callable[..., list[str]], personas: dict[str, Any], model: Any, *, n: int, accuracy: float,
             at: dt.datetime, version: int, role: str, errors: int = 0, with_truth: int | None = None,
             seed: int = 0) -> list[str]:
    """``n`` predictions of ``version`` as ``role`` (all answering 1), of which ``with_truth`` get ground truth,
    correct with probability ``accuracy``."""
    _columns, X, _y = reference_matrix()
    rng = np.random.default_rng(seed)
    ids = log_rows(X[rng.integers(0, len(X), n)], at=at, outputs=[1] * n, version=version, role=role,
                   errors=errors)
    truth = ids[errors:][:with_truth] if with_truth is not None else ids[errors:]
    correct = rng.random(len(truth)) < accuracy
    if truth:
        feedback_receive(model=model, environment="dev", items=[
            {"prediction_id": pid, "actual": 1 if ok else 0} for pid, ok in zip(truth, correct, strict=True)],
            actor=personas["ds"])
    return ids


def history(log_rows: Callable[..., list[str]], personas: dict[str, Any], model: Any) -> None:
    """The champion's past week with ground truth: what the plan's baseline reads."""
    labelled(log_rows, personas, model, n=200, accuracy=0.8, at=timezone.now() - dt.timedelta(hours=3), version=1,
             role="champion", seed=1)
    rollup_dirty()


LATER = dt.timedelta(minutes=2)


def after_start() -> dt.datetime:
    """A time in the first minute the analysis counts (the start's own minute is left out)."""
    return timezone.now().replace(second=0, microsecond=0) + dt.timedelta(minutes=1, seconds=5)


def start(personas: dict[str, Any], model: Any, **overrides: Any) -> Experiment:
    kwargs = {"metric": "accuracy", "mde": 0.1, "guardrails": {}} | overrides
    return services.experiment_start(model=model, environment="dev", actor=personas["ds"], **kwargs)


# --- Refusals -----------------------------------------------------------------------------------------------------

def test_bad_input_is_refused_with_a_message_to_act_on(two_versions: list[ModelVersion], personas: dict[str, Any],
                                                       log_rows: Callable[..., list[str]]) -> None:
    model = two_versions[0].model
    deploy_now(two_versions[0], personas["ds"])
    with pytest.raises(ValidationError, match="deploy the challenger with strategy canary"):
        start(personas, model)
    deploy_now(two_versions[1], personas["ds"], strategy="canary", traffic_percent=50)

    # A metric without ground truth: nothing has been sent for the champion yet.
    with pytest.raises(ValidationError, match=r"No ground truth for accuracy yet.*/api/v1/serve/churn/dev/feedback"):
        start(personas, model)
    # A metric that does not fit the model: log loss needs probabilities; MAE a regressor.
    history(log_rows, personas, model)
    with pytest.raises(ValidationError, match="log_loss needs a predicted probability"):
        start(personas, model, metric="log_loss")
    with pytest.raises(ValidationError, match="mae does not fit v1, a classification model"):
        start(personas, model, metric="mae")
    # A share outside 1-99 %.
    for share in (0, 100, 150, -5):
        with pytest.raises(ValidationError, match="whole percentage from 1 to 99"):
            start(personas, model, traffic_percent=share)
    with pytest.raises(ValidationError, match="positive number in the metric's units"):
        start(personas, model, mde=0)
    # Overlapping experiments on one environment.
    first = start(personas, model)
    with pytest.raises(ValidationError, match=f"Experiment {first.uid} already runs on churn in dev.*Stop it first"):
        start(personas, model)
    assert Experiment.objects.count() == 1
    assert AuditEvent.objects.filter(action="experiment.start").count() == 1


def test_the_api_refuses_with_the_contract_error_shape_and_writes_nothing(
        canary: list[ModelVersion], personas: dict[str, Any], log_rows: Callable[..., list[str]],
        api_as: Callable[[Any], Any]) -> None:
    model = canary[0].model
    client = api_as(personas["ds"])
    body = {"model": "churn", "environment": "dev", "metric": "accuracy", "mde": 0.05}
    before = AuditEvent.objects.count()
    error = assert_error_shape(client.post("/api/v1/experiments/", body, format="json"), 400)
    assert "No ground truth for accuracy yet" in str(error["error"]["details"])
    history(log_rows, personas, model)
    before = AuditEvent.objects.count()
    error = assert_error_shape(client.post("/api/v1/experiments/", {**body, "traffic_percent": 100}, format="json"),
                               400)
    assert "from 1 to 99" in str(error["error"]["details"])
    assert AuditEvent.objects.count() == before and not Experiment.objects.exists()
    # The plan for the form: sample size and days at today's traffic.
    plan = client.get("/api/v1/experiments/plan", {"model": "churn", "environment": "dev", "metric": "accuracy",
                                                    "mde": "0.05"}).json()
    assert plan["planned_sample"] > plan["fixed_horizon_sample"] > 0 and plan["days"] > 0
    created = client.post("/api/v1/experiments/", {**body, "traffic_percent": 30, "guardrails": {
        "error_rate_max": 0.02, "drift_psi_max": None}}, format="json")
    assert created.status_code == 201, created.content
    doc = created.json()
    assert doc["traffic_percent"] == 30 and doc["guardrails"]["error_rate_max"] == 0.02
    assert "drift_psi_max" not in doc["guardrails"] and doc["guardrails"]["latency_p99_ms"] == 250.0
    assert "drift_psi_max" not in services.clean_guardrails({}, model)
    assert services.clean_guardrails({"drift_psi_max": 0.3}, model)["drift_psi_max"] == 0.3
    # The split moved with it, audited as a traffic switch; the start records every setting.
    assert EnvironmentState.objects.get(model=model, environment="dev").challenger_percent == 30
    event = AuditEvent.objects.filter(action="experiment.start").get()
    assert event.after["metric"] == "accuracy" and event.after["planned_sample"] == doc["planned_sample"]
    second = client.post("/api/v1/experiments/", body, format="json")
    assert "already runs" in str(assert_error_shape(second, 400)["error"]["details"])
    # Viewers read, never start; outsiders do not see it at all.
    assert api_as(personas["viewer"]).get(f"/api/v1/experiments/{doc['id']}/").status_code == 200
    assert api_as(personas["outsider"]).get(f"/api/v1/experiments/{doc['id']}/").status_code == 404


# --- Verdicts -----------------------------------------------------------------------------------------------------

def test_a_win_opens_a_promotion_request_that_carries_the_experiment(
        canary: list[ModelVersion], personas: dict[str, Any], log_rows: Callable[..., list[str]]) -> None:
    model = canary[0].model
    history(log_rows, personas, model)
    experiment = start(personas, model, mde=0.1)
    now = after_start()
    labelled(log_rows, personas, model, n=experiment.planned_sample, accuracy=0.75, at=now, version=1,
             role="champion", seed=2)
    labelled(log_rows, personas, model, n=experiment.planned_sample, accuracy=0.92, at=now, version=2,
             role="canary", seed=3)
    rollup_dirty()
    experiment = services.experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert experiment is not None
    assert experiment.verdict == Verdict.CHALLENGER_WINS, experiment.verdict_sentence
    assert experiment.status == ExperimentStatus.ENDED
    assert experiment.verdict_sentence.startswith("The challenger v2 wins: its accuracy is")
    low, high = experiment.analysis["interval"]
    assert 0 < low < 0.17 < high
    promotion = PromotionRequest.objects.get(version=canary[1], target="stage")
    assert experiment.promotion == promotion and promotion.requested_by == personas["ds"]
    assert str(experiment.uid) in promotion.reason
    verdict_event = AuditEvent.objects.filter(action="experiment.verdict").get()
    assert verdict_event.after["verdict"] == "challenger_wins" and verdict_event.after["interval"] == [low, high]
    # The challenger keeps its traffic until the promotion is decided.
    assert EnvironmentState.objects.get(model=model, environment="dev").mode == ServingMode.CANARY

    # The approver sees verdict, interval and plot on the promotion page, beside the live evidence.
    client = Client()
    client.force_login(personas["approver1"])
    page = client.get(f"/promotions/{promotion.uid}/").content.decode()
    assert 'data-testid="promotion-experiment"' in page and 'data-verdict="challenger_wins"' in page
    assert "experiment-series" in page and "monitoring/experiment" in page
    # plotly's basic bundle (scatter, its band and error bars): no cartesian bundle for traces it never draws
    assert "/static/vendor/plotly/plotly-basic.min.js" in page and "plotly-cartesian" not in page
    assert experiment.analysis["interval_display"] in page
    # Evaluating again changes nothing: it has ended.
    assert services.experiment_evaluate(experiment_id=experiment.pk, now=now + LATER) is None
    assert AuditEvent.objects.filter(action="experiment.verdict").count() == 1


def test_a_worse_challenger_loses_and_its_traffic_stops(canary: list[ModelVersion], personas: dict[str, Any],
                                                        log_rows: Callable[..., list[str]]) -> None:
    model = canary[0].model
    history(log_rows, personas, model)
    experiment = start(personas, model, mde=0.1)
    now = after_start()
    labelled(log_rows, personas, model, n=experiment.planned_sample, accuracy=0.9, at=now, version=1,
             role="champion", seed=4)
    labelled(log_rows, personas, model, n=experiment.planned_sample, accuracy=0.7, at=now, version=2,
             role="canary", seed=5)
    rollup_dirty()
    experiment = services.experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert experiment is not None and experiment.verdict == Verdict.CHAMPION_HOLDS, experiment.verdict_sentence
    assert EnvironmentState.objects.get(model=model, environment="dev").mode == ServingMode.SINGLE
    assert not PromotionRequest.objects.filter(version=canary[1]).exists()


def test_a_guardrail_breach_stops_the_challengers_traffic_and_is_audited_together(
        canary: list[ModelVersion], personas: dict[str, Any], log_rows: Callable[..., list[str]]) -> None:
    model = canary[0].model
    history(log_rows, personas, model)
    experiment = start(personas, model, guardrails={"error_rate_max": 0.05})
    hook = TeamWebhook.objects.create(team=model.team, url="https://hooks.example.com/in", secret="s" * 32,
                                      events=["experiment.verdict"])
    now = after_start()
    labelled(log_rows, personas, model, n=100, accuracy=0.8, at=now, version=1, role="champion", seed=6)
    labelled(log_rows, personas, model, n=100, accuracy=0.8, at=now, version=2, role="canary", errors=20, seed=7)
    rollup_dirty()
    first = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first()
    experiment = services.experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert experiment is not None and experiment.verdict == Verdict.GUARDRAIL
    assert "error rate reached 20.00% (limit ≤ 5.00%)" in experiment.verdict_sentence
    state = EnvironmentState.objects.get(model=model, environment="dev")
    assert state.mode == ServingMode.SINGLE and state.challenger_id is None
    actions = list(AuditEvent.objects.filter(seq__gt=first).order_by("seq").values_list("action", flat=True))
    assert actions == ["experiment.guardrail_breach", "experiment.verdict", "traffic.switch"]
    switch = AuditEvent.objects.filter(action="traffic.switch").order_by("-seq").first()
    assert switch is not None and f"experiment {experiment.uid}" in switch.metadata["reason"]
    assert switch.after["challenger"] is None
    # The team hears of it: its webhook gets the verdict (delivered by the worker once committed).
    delivery = WebhookDelivery.objects.get(webhook=hook)
    assert delivery.event == "experiment.verdict" and delivery.payload["verdict"] == "guardrail"


def test_a_sample_ratio_mismatch_makes_the_experiment_invalid(
        canary: list[ModelVersion], personas: dict[str, Any], log_rows: Callable[..., list[str]]) -> None:
    model = canary[0].model
    history(log_rows, personas, model)
    experiment = start(personas, model, mde=0.2)
    now = after_start()
    labelled(log_rows, personas, model, n=600, accuracy=0.8, at=now, version=1, role="champion", seed=8)
    labelled(log_rows, personas, model, n=450, accuracy=0.8, at=now, version=2, role="canary", seed=9)
    rollup_dirty()
    experiment = services.experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert experiment is not None and experiment.verdict == Verdict.INVALID
    assert "sample-ratio mismatch" in experiment.verdict_sentence
    assert experiment.analysis["srm"]["requests"] == [600, 450]


def test_outcomes_not_in_yet_are_not_counted_and_are_reported_as_waiting(
        canary: list[ModelVersion], personas: dict[str, Any], log_rows: Callable[..., list[str]],
        api_as: Callable[[Any], Any]) -> None:
    model = canary[0].model
    history(log_rows, personas, model)
    experiment = start(personas, model)
    now = after_start()
    labelled(log_rows, personas, model, n=80, accuracy=0.8, at=now, version=1, role="champion", with_truth=50)
    labelled(log_rows, personas, model, n=80, accuracy=0.8, at=now, version=2, role="canary", with_truth=60)
    rollup_dirty()
    experiment = services.experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert experiment is not None and experiment.verdict == Verdict.RUNNING
    arms = experiment.analysis["arms"]
    assert (arms["champion"]["outcomes"], arms["champion"]["waiting"]) == (50, 30)
    assert (arms["challenger"]["outcomes"], arms["challenger"]["waiting"]) == (60, 20)
    assert "Too early to tell" in experiment.verdict_sentence and "(50 more wait for theirs)" in \
        experiment.verdict_sentence
    # The CLI's status and the page read the same.
    doc = api_as(personas["viewer"]).get(f"/api/v1/experiments/{experiment.uid}/").json()
    assert doc["verdict"] == "running" and doc["analysis"]["waiting"] == 50
    client = Client()
    client.force_login(personas["viewer"])
    page = client.get(f"/experiments/{experiment.uid}/").content.decode()
    assert "Too early to tell" in page and 'data-testid="experiment-chart"' in page
    assert 'data-testid="experiment-stop"' not in page  # viewers do not stop experiments


def test_settings_changes_and_a_stop_are_audited(canary: list[ModelVersion], personas: dict[str, Any],
                                                log_rows: Callable[..., list[str]]) -> None:
    model = canary[0].model
    history(log_rows, personas, model)
    experiment = start(personas, model)
    services.experiment_settings_change(experiment=experiment, actor=personas["ds"],
                                        guardrails={"error_rate_max": 0.01}, name="calibrated")
    change = AuditEvent.objects.get(action="experiment.settings_change")
    assert change.before["guardrails"]["error_rate_max"] == 0.05
    assert change.after["guardrails"]["error_rate_max"] == 0.01 and change.after["name"] == "calibrated"
    with pytest.raises(Exception, match="not allow"):
        services.experiment_stop(experiment=experiment, actor=personas["viewer"])
    stopped = services.experiment_stop(experiment=experiment, actor=personas["ds"], reason="wrong metric",
                                       stop_traffic=True)
    assert stopped.verdict == Verdict.STOPPED and "wrong metric" in stopped.verdict_sentence
    assert AuditEvent.objects.filter(action="experiment.stop").get().after["reason"] == "wrong metric"
    assert EnvironmentState.objects.get(model=model, environment="dev").mode == ServingMode.SINGLE
    assert selectors.running_experiment(model, "dev") is None
    # A new one may start once the old one ended... but not without a canary.
    with pytest.raises(ValidationError, match="No canary challenger"):
        start(personas, model)


def test_rollups_hold_request_counts_and_metric_sums(canary: list[ModelVersion], personas: dict[str, Any],
                                                     log_rows: Callable[..., list[str]]) -> None:
    """What the analysis reads: per minute and arm, requests and (n, sum, sum of squares) of each metric, summed
    into hours."""
    from monitoring.models import Rollup

    model = canary[0].model
    at = timezone.now().replace(second=0, microsecond=0)
    labelled(log_rows, personas, model, n=40, accuracy=0.5, at=at, version=2, role="canary", with_truth=30)
    rollup_dirty()
    for granularity in ("minute", "hour"):
        row = Rollup.objects.get(model_name="churn", environment="dev", granularity=granularity, role="canary")
        truth = row.data["truth"]
        assert row.data["requests"] == 40
        # Every prediction answered 1, so the 0/1 outcome is 1 exactly when the prediction was right.
        assert truth["outcome"] == [30, float(truth["correct"]), float(truth["correct"])]
        assert selectors.metric_sums(truth, "accuracy") == (30.0, float(truth["correct"]), float(truth["correct"]))
        assert selectors.metric_sums(truth, "outcome") == (30.0, float(truth["correct"]), float(truth["correct"]))


def test_the_start_form_shows_the_plan_and_starts_the_experiment(
        canary: list[ModelVersion], personas: dict[str, Any], log_rows: Callable[..., list[str]]) -> None:
    model = canary[0].model
    history(log_rows, personas, model)
    client = Client()
    client.force_login(personas["ds"])
    page = client.get("/models/churn/environments/dev/experiments",
                      {"plan": "1", "metric": "accuracy", "mde": "0.05", "alpha": "0.05",
                       "traffic_percent": "40"}).content.decode()
    plan = services.experiment_plan(model=model, environment="dev", metric="accuracy", mde=0.05, alpha=0.05,
                                    traffic_percent=40)
    assert f"<strong>{plan['planned_sample']}</strong> predictions with a known outcome per side" in page
    assert "days</strong>" in page
    bad = client.post("/models/churn/environments/dev/experiments",
                      {"metric": "accuracy", "mde": "0.05", "traffic_percent": "100"})
    assert bad.status_code == 400 and "from 1 to 99" in bad.content.decode()
    started = client.post("/models/churn/environments/dev/experiments",
                          {"metric": "accuracy", "mde": "0.05", "alpha": "0.05", "traffic_percent": "40",
                           "error_rate_max": "0.02", "drift_psi_max": "off"})
    experiment = Experiment.objects.get()
    assert started.status_code == 302 and started["Location"] == f"/experiments/{experiment.uid}/"
    assert experiment.traffic_percent == 40 and experiment.guardrails == {"error_rate_max": 0.02,
                                                                          "latency_p99_ms": 250.0}
    assert experiment.planned_sample == plan["planned_sample"]
    # The monitoring page links to it while a canary runs.
    assert 'data-testid="experiments-link"' in client.get("/models/churn/environments/dev/monitoring").content.decode()
