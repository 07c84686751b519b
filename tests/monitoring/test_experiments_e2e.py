"""An A/B experiment end to end on PostgreSQL, Redis and a real worker: two deployed versions whose accuracies are
known (0.80 and 0.86: the ground truth sent back makes exactly that share of each one's answers right), traffic and
feedback through the HTTP API, the CLI starting and following the experiment, the worker's flush, rollup and stop
rule reaching "challenger wins" with a promotion request that carries it; then a second experiment whose challenger
breaks its error-rate guardrail has its traffic stopped by the worker, audited."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from typing import Any

import pytest
import requests
from django.test import Client
from django.utils import timezone

from monitoring.experiments.models import Experiment
from monitoring.experiments.tasks import experiments_check_task
from monitoring.flush import write_batches
from monitoring.models import RollupDirty
from monitoring.tasks import rollup_task
from portal import services as portal_services
from portal.cli import main
from portal.models import AuditEvent
from registry.models import EnvironmentState, ModelVersion, PromotionRequest, ServingMode
from registry.serving import runtime
from tests.conftest import wait_for
from tests.registry import files

pytestmark = pytest.mark.slow

ACCURACY = {1: 0.80, 2: 0.86}
ROWS_PER_REQUEST = 10


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        X, _y = files._data()
        self.columns, self.matrix = list(X.columns), X.to_numpy()
        self.sent = 0
        self.answered: dict[int, int] = {1: 0, 2: 0}  # predictions per version, for the exact accuracies

    def deploy(self, number: int, **body: Any) -> None:
        r = self.session.post(f"{self.url}/api/v1/models/churn/versions/{number}/deploy",
                              json={"environment": "dev", **body}, timeout=30)
        assert r.status_code == 202, r.text
        uid = r.json()["id"]
        wait_for(lambda: self.session.get(f"{self.url}/api/v1/deployments/{uid}/", timeout=30).json()["status"]
                 == "live", timeout=180, what=f"v{number} live")

    def traffic(self, requests_count: int) -> dict[int, int]:
        """Requests with their own routing keys, then ground truth for every prediction: right for exactly
        ACCURACY[version] of each version's answers. Returns the requests each version answered."""
        feedback, served = [], {1: 0, 2: 0}
        for _ in range(requests_count):
            start = (self.sent * ROWS_PER_REQUEST) % (len(self.matrix) - ROWS_PER_REQUEST)
            rows = self.matrix[start:start + ROWS_PER_REQUEST].tolist()
            r = self.session.post(f"{self.url}/api/v1/serve/churn/dev/invocations",
                                  json={"dataframe_split": {"columns": self.columns, "data": rows}},
                                  headers={"X-Routing-Key": f"customer-{self.sent}"}, timeout=30)
            self.sent += 1
            assert r.status_code == 200, r.text
            body = r.json()
            version = int(body["model_version"])
            served[version] += 1
            for pid, predicted in zip(body["prediction_ids"], body["predictions"], strict=True):
                right = self.answered[version] % 50 < round(ACCURACY[version] * 50)
                self.answered[version] += 1
                feedback.append({"prediction_id": pid, "actual": int(predicted) if right else 1 - int(predicted)})
        r = self.session.post(f"{self.url}/api/v1/serve/churn/dev/feedback", json=feedback, timeout=120)
        assert r.status_code == 202 and r.json()["refused"] == 0, r.text
        return served


def roll_up() -> None:
    """The worker rolls the new predictions and their ground truth up."""
    rollup_task.delay()
    wait_for(lambda: not RollupDirty.objects.exists(), timeout=120, what="rollups")


def evaluate(experiment: Experiment) -> Experiment:
    """The worker runs the stop rule (beat's task) once."""
    before = Experiment.objects.get(pk=experiment.pk).analysed_at
    experiments_check_task.delay()
    wait_for(lambda: Experiment.objects.get(pk=experiment.pk).analysed_at != before, timeout=120,
             what="the stop rule")
    return Experiment.objects.get(pk=experiment.pk)


def next_minute() -> None:
    """Analysis counts from the first whole minute after the start."""
    now = timezone.now()
    time.sleep(60 - now.second - now.microsecond / 1e6 + 0.5)


def cli(live_server: Any, token: str, capsys: Any, *args: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["--url", live_server.url, "--token", token, *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_an_experiment_reaches_a_verdict_end_to_end_and_a_guardrail_stops_a_bad_challenger(
        live_server: Any, worker_factory: Any, two_versions: list[ModelVersion], personas: dict[str, Any],
        capsys: Any) -> None:
    runtime.cache.clear()
    worker_factory()
    _t, token = portal_services.token_create(user=personas["ds"], name="ci", actor=personas["ds"])
    api = Api(live_server.url, token)
    api.deploy(1)
    api.traffic(20)  # the champion's history: the plan's baseline
    roll_up()
    api.deploy(2, strategy="canary", traffic_percent=50)

    # Refused with a message to act on, through the CLI: exit 1, the API's error.
    code, out = cli(live_server, token, capsys, "experiment", "start", "churn", "dev", "--metric", "mae",
                    "--mde", "0.1")
    assert code == 1 and "mae does not fit v1" in json.dumps(out["error"])
    code, out = cli(live_server, token, capsys, "experiment", "start", "churn", "dev", "--metric", "accuracy",
                    "--mde", "0.06", "--guardrails", '{"error_rate_max": 0.05}')
    assert code == 0 and out["outcome"] == "started", out
    uid = out["experiment"]["id"]
    planned = out["experiment"]["planned_sample"]
    experiment = Experiment.objects.get(uid=uid)
    code, out = cli(live_server, token, capsys, "experiment", "status", uid)
    assert code == 4 and out["outcome"] == "running"

    next_minute()
    rounds = 0
    while experiment.verdict == "running" and rounds < 12:
        api.traffic(40)
        roll_up()
        experiment = evaluate(experiment)
        rounds += 1
    assert experiment.verdict == "challenger_wins", experiment.verdict_sentence
    analysis = experiment.analysis
    champion, challenger = analysis["arms"]["champion"], analysis["arms"]["challenger"]
    assert challenger["outcomes"] <= planned, "a verdict within the planned sample"
    # The accuracies are the known ones, counted on predictions with their outcome only.
    assert abs(champion["mean"] - 0.80) < 0.01 and abs(challenger["mean"] - 0.86) < 0.01
    assert analysis["interval"][0] > 0 and not analysis["srm"]["mismatch"]
    assert analysis["waiting"] == 0

    code, out = cli(live_server, token, capsys, "experiment", "status", uid)
    assert code == 0 and out["outcome"] == "challenger_wins" and out["experiment"]["promotion"]
    promotion = PromotionRequest.objects.get(uid=out["experiment"]["promotion"])
    assert promotion.version == two_versions[1] and promotion.target == "stage" and uid in promotion.reason
    approver = Client()
    approver.force_login(personas["approver1"])
    page = approver.get(f"/promotions/{promotion.uid}/").content.decode()
    assert 'data-verdict="challenger_wins"' in page and analysis["interval_display"] in page
    assert AuditEvent.objects.filter(action="experiment.verdict", target_id=uid).get().after["verdict"] == \
        "challenger_wins"

    # A second experiment, whose challenger starts failing: the worker's stop rule stops its traffic.
    code, out = cli(live_server, token, capsys, "experiment", "start", "churn", "dev", "--metric", "accuracy",
                    "--mde", "0.06", "--guardrails", '{"error_rate_max": 0.05}')
    assert code == 0, out
    second = Experiment.objects.get(uid=out["experiment"]["id"])
    next_minute()
    api.traffic(10)
    # The challenger's failures, as the flusher writes them (a model error is logged with its error text).
    now = timezone.now()
    write_batches([{"model": "churn", "environment": "dev", "version": 2, "role": "canary",
                    "ts": (now + dt.timedelta(milliseconds=i)).timestamp(), "latency_ms": 3.0,
                    "request_id": os.urandom(8).hex(), "error": "ValueError: Input contains NaN",
                    "ids": [os.urandom(16).hex()], "inputs": [api.matrix[0].tolist()], "outputs": [None],
                    "subjects": None} for i in range(30)])
    roll_up()
    second = evaluate(second)
    assert second.verdict == "guardrail", second.verdict_sentence
    state = EnvironmentState.objects.get(model=two_versions[0].model, environment="dev")
    assert state.mode == ServingMode.SINGLE and state.challenger_id is None
    breach = AuditEvent.objects.filter(action="experiment.guardrail_breach", target_id=str(second.uid)).get()
    assert breach.after["guardrails"][0]["name"] == "error_rate_max"
    switch = AuditEvent.objects.filter(action="traffic.switch").order_by("-seq").first()
    assert switch is not None and str(second.uid) in switch.metadata["reason"]
    code, out = cli(live_server, token, capsys, "experiment", "status", str(second.uid))
    assert code == 1 and out["outcome"] == "guardrail"
    # Every request is the champion's again.
    time.sleep(1.0)  # past the route refresh interval
    served = api.traffic(10)
    assert served == {1: 10, 2: 0}
