"""Changing a running experiment's traffic share through the API changes what the router really sends the
challenger (requests scored through the production entry point, counted per version), in the transaction that
records the change and its audit events; the sample-ratio check then expects each unit on the split of its first
request. Bad input is refused with the contract's 4xx and writes nothing; each role gets what it may."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from monitoring.experiments import services, stats
from monitoring.experiments.models import Experiment, ExperimentUnit
from monitoring.flush import flush_predictions
from monitoring.models import PredictionLog
from monitoring.rollups import rollup_dirty
from portal import services as portal_services
from portal.models import AuditEvent
from registry.models import EnvironmentState, ModelVersion, ServingInterval
from registry.serving import runtime
from registry.serving.views import subject_hash
from tests.conftest import EntryPointClient, assert_error_shape
from tests.monitoring.test_experiments import LATER, history
from tests.registry.conftest import deploy_now
from tests.registry.conftest import rows as _rows

pytestmark = pytest.mark.django_db

URL = "/api/v1/serve/churn/dev/invocations"


def send(scoring: Client, keys: range) -> Counter[int]:
    """One request per routing key; the versions that answered."""
    body = json.dumps({"instances": _rows(1)[1]})
    answered: Counter[int] = Counter()
    for i in keys:
        response = scoring.post(URL, body, content_type="application/json", HTTP_X_ROUTING_KEY=f"customer-{i}")
        assert response.status_code == 200, response.content
        answered[response.json()["model_version"]] += 1
    return answered


@pytest.fixture
def scoring(two_versions: list[ModelVersion], personas: dict[str, Any]) -> Client:
    """v1 serving churn in dev, and a client that scores through the production entry point with a data
    scientist's token."""
    deploy_now(two_versions[0], personas["ds"])
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="serve", actor=personas["ds"])
    return EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")


def routed_again() -> None:
    """Web workers re-read the split within ``REFRESH_SECONDS``."""
    time.sleep(runtime.REFRESH_SECONDS + 0.1)


@pytest.fixture
def running(scoring: Client, two_versions: list[ModelVersion], personas: dict[str, Any],
            log_rows: Callable[..., list[str]], api_as: Callable[[Any], Any]) -> Experiment:
    """v1 champion, v2 its canary; an experiment started through the API with the challenger on 10 %."""
    deploy_now(two_versions[1], personas["ds"], strategy="canary", traffic_percent=50)
    history(log_rows, personas, two_versions[0].model)
    created = api_as(personas["ds"]).post("/api/v1/experiments/", {
        "model": "churn", "environment": "dev", "metric": "accuracy", "mde": 0.1, "traffic_percent": 10,
        "guardrails": {}}, format="json")
    assert created.status_code == 201, created.content
    return Experiment.objects.get(uid=created.json()["id"])


def test_a_new_share_is_what_the_router_sends_the_challenger(
        running: Experiment, scoring: Client, personas: dict[str, Any], api_as: Callable[[Any], Any]) -> None:
    routed_again()
    before = send(scoring, range(0, 1500))
    assert abs(before[2] / 1500 - 0.10) <= 0.03, before
    on_challenger = [i for i in range(0, 200) if send(scoring, range(i, i + 1))[2]]

    changed = api_as(personas["ds"]).patch(f"/api/v1/experiments/{running.uid}/", {"traffic_percent": 40},
                                           format="json")
    assert changed.status_code == 200, changed.content
    doc = changed.json()
    # The plan follows the split (per smaller arm, with the mixing variance chosen at the start).
    assert doc["traffic_percent"] == 40 and doc["planned_sample"] == stats.planned_sample(
        tau2=running.tau2, sd=running.baseline_sd, mde=running.mde, alpha=running.alpha, share=0.4)
    assert doc["planned_sample"] != running.planned_sample
    state = EnvironmentState.objects.get(model=running.model, environment="dev")
    assert state.challenger_percent == 40
    # Both audit events: the experiment's settings (before and after) and the deployment's traffic switch.
    change = AuditEvent.objects.get(action="experiment.settings_change")
    assert (change.before["traffic_percent"], change.after["traffic_percent"]) == (10, 40)
    switch = AuditEvent.objects.filter(action="traffic.switch").order_by("-seq").first()
    assert switch is not None and f"experiment {running.uid}" in switch.metadata["reason"]
    assert switch.after["challenger_percent"] == 40
    assert ServingInterval.objects.get(role="canary", ended_at__isnull=True).traffic_percent == 40

    routed_again()
    after = send(scoring, range(1500, 3000))
    assert abs(after[2] / 1500 - 0.40) <= 0.04, after
    # Sticky: a user on the challenger stays there when its share grows.
    assert all(send(scoring, range(i, i + 1))[2] for i in on_challenger[:20])

    # The log keeps each request's unit (its routing key, keyed), and the sample-ratio check expects each unit on
    # the split of its first request: 10 % for the first 1,500 users, 40 % for the next.
    flush_predictions()
    logged = PredictionLog.objects.filter(unit_hash=subject_hash("customer-1600")).get()
    assert logged.version in (1, 2)
    rollup_dirty()
    experiment = services.experiment_evaluate(experiment_id=running.pk, now=timezone.now() + LATER)
    assert experiment is not None
    srm = experiment.analysis["srm"]
    assert [s["share"] for s in srm["splits"]] == [0.1, 0.4]
    assert ExperimentUnit.objects.filter(experiment=experiment).count() == 3000
    assert srm["units"] == [3000 - before[2] - after[2], before[2] + after[2]]
    assert srm["expected_share"] == pytest.approx(0.25, abs=0.01)
    assert not srm["mismatch"], srm


def test_a_share_change_commits_with_its_audit_event_or_not_at_all(
        running: Experiment, personas: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("the audit trail is unavailable")

    monkeypatch.setattr(services, "audit_record", refuse)
    events = AuditEvent.objects.count()
    with pytest.raises(RuntimeError):
        services.experiment_settings_change(experiment=running, actor=personas["ds"], traffic_percent=60)
    assert EnvironmentState.objects.get(model=running.model, environment="dev").challenger_percent == 10
    assert Experiment.objects.get(pk=running.pk).traffic_percent == 10
    assert AuditEvent.objects.count() == events, "the traffic switch's own event went back with it"
    assert ServingInterval.objects.get(role="canary", ended_at__isnull=True).traffic_percent == 10


def test_bad_shares_are_refused_and_write_nothing(running: Experiment, personas: dict[str, Any],
                                                  api_as: Callable[[Any], Any]) -> None:
    client = api_as(personas["ds"])
    url = f"/api/v1/experiments/{running.uid}/"
    events = AuditEvent.objects.count()
    for share, words in ((0, "from 1 to 99"), (100, "from 1 to 99"), (-3, "from 1 to 99"),
                         ("many", "valid integer")):
        error = assert_error_shape(client.patch(url, {"traffic_percent": share}, format="json"), 400)
        assert words in json.dumps(error), error
    assert AuditEvent.objects.count() == events
    assert EnvironmentState.objects.get(model=running.model, environment="dev").challenger_percent == 10
    # The challenger no longer the canary (its traffic was stopped outside the experiment): nothing to change.
    from registry.deployments.services import challenger_stop

    challenger_stop(model=running.model, environment="dev", actor=personas["ds"], reason="by hand")
    events = AuditEvent.objects.count()
    error = assert_error_shape(client.patch(url, {"traffic_percent": 30}, format="json"), 400)
    assert "no longer serves as the canary" in json.dumps(error)
    assert AuditEvent.objects.count() == events and Experiment.objects.get(pk=running.pk).traffic_percent == 10
    # An ended experiment's share is not changed.
    services.experiment_stop(experiment=running, actor=personas["ds"])
    error = assert_error_shape(client.patch(url, {"traffic_percent": 30}, format="json"), 400)
    assert "has ended" in json.dumps(error)


@pytest.mark.parametrize(("persona", "status"), [("ds", 200), ("admin", 200), ("approver1", 403),
                                                 ("viewer", 403), ("compliance", 403), ("outsider", 404)])
def test_who_may_change_the_share(running: Experiment, personas: dict[str, Any], api_as: Callable[[Any], Any],
                                  persona: str, status: int) -> None:
    response = api_as(personas[persona]).patch(f"/api/v1/experiments/{running.uid}/", {"traffic_percent": 20},
                                               format="json")
    assert response.status_code == status, response.content
    share = EnvironmentState.objects.get(model=running.model, environment="dev").challenger_percent
    assert share == (20 if status == 200 else 10)
    if status != 200:
        assert_error_shape(response, status)
        assert not AuditEvent.objects.filter(action="experiment.settings_change").exists()
