"""Per-segment analysis of one categorical input column: predictions logged as the flusher writes them, ground
truth through the feedback service, rolled up by the portal's roll-up; an effect that exists only in one region shows
in that region's row (with its Bonferroni-corrected interval and the caveat said), the others show no difference,
in the analysis, the API answer, the CLI's --json and the page. Bad columns are refused with a message a person can
act on; each role gets what it may."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from django.test import Client

from monitoring.experiments import services
from monitoring.experiments.models import Experiment
from monitoring.feedback import feedback_receive
from monitoring.rollups import rollup_dirty
from portal import services as portal_services
from portal.cli import main
from portal.models import AuditEvent
from registry.models import ModelVersion
from tests.conftest import assert_error_shape
from tests.monitoring.conftest import reference_matrix
from tests.monitoring.test_experiments import LATER, after_start, canary, history  # noqa: F401 - fixture

REGIONS = ["east", "north", "south", "west"]
POSTCODES = [f"{1000 + i}" for i in range(30)]


@pytest.fixture
def regional(canary: list[ModelVersion]) -> list[ModelVersion]:  # noqa: F811
    """Both versions read a categorical ``region`` (four values) as their first input and a ``postcode`` (thirty) as
    their second, as their signatures and reference profiles say."""
    for version in canary:
        signature = dict(version.signature)
        inputs = list(signature["inputs"])
        inputs[0], inputs[1] = {"name": "region", "type": "string"}, {"name": "postcode", "type": "string"}
        signature["inputs"] = inputs
        ModelVersion.objects.filter(pk=version.pk).update(signature=signature)
        assert version.reference is not None
        profile = dict(version.reference.profile)
        features = {k: v for k, v in profile["features"].items() if k not in ("mean radius", "mean texture")}
        features["region"] = {"kind": "categorical", "missing_rate": 0.0,
                              "frequencies": {r: 100 for r in REGIONS}}
        features["postcode"] = {"kind": "categorical", "missing_rate": 0.0,
                                "frequencies": {p: 10 for p in POSTCODES}}
        profile["features"] = features
        version.reference.profile = profile
        version.reference.save(update_fields=["profile"])
    return [ModelVersion.objects.get(pk=v.pk) for v in canary]


def regional_traffic(log_rows: Callable[..., list[str]], personas: dict[str, Any], model: Any, at: Any, *,
                     version: int, role: str, accuracy: dict[str, float], per_region: int = 400) -> None:
    """``per_region`` predictions of ``version`` in each region (all answering 1), every one with ground truth,
    right for exactly ``accuracy[region]`` of them."""
    _columns, X, _y = reference_matrix()
    rng = np.random.default_rng(version)
    for region in REGIONS:
        matrix = X[rng.integers(0, len(X), per_region)].astype(object)
        matrix[:, 0] = region
        matrix[:, 1] = POSTCODES[0]
        ids = log_rows(matrix, at=at, outputs=[1] * per_region, version=version, role=role)
        right = round(accuracy[region] * per_region)
        feedback_receive(model=model, environment="dev", actor=personas["ds"], items=[
            {"prediction_id": pid, "actual": 1 if i < right else 0} for i, pid in enumerate(ids)])


def test_an_effect_in_one_segment_shows_there_in_the_analysis_api_cli_and_page(
        transactional_db: None, live_server: Any, regional: list[ModelVersion], personas: dict[str, Any],
        log_rows: Callable[..., list[str]], api_as: Callable[[Any], Any], capsys: Any) -> None:
    model = regional[0].model
    history(log_rows, personas, model)
    created = api_as(personas["ds"]).post("/api/v1/experiments/", {
        "model": "churn", "environment": "dev", "metric": "accuracy", "mde": 0.1, "guardrails": {},
        "segment_column": "region"}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["segment_column"] == "region"
    experiment = Experiment.objects.get(uid=created.json()["id"])
    assert AuditEvent.objects.get(action="experiment.start").after["segment_column"] == "region"
    now = after_start()
    flat = dict.fromkeys(REGIONS, 0.8)
    regional_traffic(log_rows, personas, model, now, version=1, role="champion", accuracy=flat)
    regional_traffic(log_rows, personas, model, now, version=2, role="canary", accuracy={**flat, "south": 0.95})
    rollup_dirty()
    evaluated = services.experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert evaluated is not None
    segments = evaluated.analysis["segments"]
    assert segments["column"] == "region" and segments["segments"] == 4
    assert segments["alpha_each"] == pytest.approx(0.05 / 4) and "Bonferroni" in segments["caveat"]
    rows = {row["segment"]: row for row in segments["rows"]}
    assert sorted(rows) == REGIONS
    assert all((r["champion"]["outcomes"], r["challenger"]["outcomes"]) == (400, 400) for r in rows.values())
    south = rows["south"]
    assert south["verdict"] == "challenger_better" and south["difference"] == pytest.approx(0.15)
    assert south["interval"][0] > 0 and south["interval"][0] < 0.15 < south["interval"][1]
    assert "better in this segment" in south["sentence"] and "98.8% interval" in south["sentence"]
    for region in ("east", "north", "west"):
        assert rows[region]["verdict"] == "no_clear_difference" and rows[region]["difference"] == 0
        assert rows[region]["interval"][0] < 0 < rows[region]["interval"][1]

    # The API answer, the CLI's --json (which exits as status does) and the page say the same.
    doc = api_as(personas["viewer"]).get(f"/api/v1/experiments/{experiment.uid}/").json()
    assert doc["analysis"]["segments"] == json.loads(json.dumps(segments))
    _token, plaintext = portal_services.token_create(user=personas["viewer"], name="cli", actor=personas["viewer"])
    capsys.readouterr()
    code = main(["--url", live_server.url, "--token", plaintext, "experiment", "status", str(experiment.uid),
                 "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code in (0, 4)
    cli_rows = {r["segment"]: r for r in out["experiment"]["analysis"]["segments"]["rows"]}
    assert cli_rows["south"]["verdict"] == "challenger_better" and cli_rows["east"]["verdict"] == "no_clear_difference"
    code = main(["--url", live_server.url, "--token", plaintext, "experiment", "status", str(experiment.uid)])
    text = capsys.readouterr().out
    assert "per segment of region" in text and "south: 400 and 400 outcomes; v2 is better in this segment" in text
    client = Client()
    client.force_login(personas["viewer"])
    page = client.get(f"/experiments/{experiment.uid}/").content.decode()
    assert 'data-testid="experiment-segments"' in page and "Bonferroni" in page
    assert 'data-segment="south" data-verdict="challenger_better"' in page
    assert 'data-segment="east" data-verdict="no_clear_difference"' in page


@pytest.mark.django_db
def test_bad_segment_columns_are_refused_with_a_message_and_write_nothing(
        regional: list[ModelVersion], personas: dict[str, Any], log_rows: Callable[..., list[str]],
        api_as: Callable[[Any], Any]) -> None:
    model = regional[0].model
    history(log_rows, personas, model)
    client = api_as(personas["ds"])
    body = {"model": "churn", "environment": "dev", "metric": "accuracy", "mde": 0.1}
    events = AuditEvent.objects.count()
    for column, words in (("colour", "has no input column 'colour'; its inputs are: region, postcode"),
                          ("mean perimeter", "is numeric in v1's reference data; segments need a categorical"),
                          ("postcode", "has 30 categories in v1's reference data; at most 20")):
        error = assert_error_shape(client.post("/api/v1/experiments/", {**body, "segment_column": column},
                                               format="json"), 400)
        assert words in json.dumps(error["error"]["details"]), error
    ModelVersion.objects.filter(pk=regional[1].pk).update(sensitive_columns={"region": "personal"})
    error = assert_error_shape(client.post("/api/v1/experiments/", {**body, "segment_column": "region"},
                                           format="json"), 400)
    assert "personal data" in json.dumps(error["error"]["details"])
    assert not Experiment.objects.exists() and AuditEvent.objects.count() == events
    # The start form offers exactly the columns it would accept.
    ModelVersion.objects.filter(pk=regional[1].pk).update(sensitive_columns={})
    page = Client()
    page.force_login(personas["ds"])
    html = page.get("/models/churn/environments/dev/experiments").content.decode()
    assert '<option value="region">region</option>' in html and 'value="postcode"' not in html
    refused = page.post("/models/churn/environments/dev/experiments", {"metric": "accuracy", "mde": "0.1",
                                                                        "segment_column": "postcode"})
    assert refused.status_code == 400 and "at most 20 can be analysed per segment" in refused.content.decode()
    assert not Experiment.objects.exists()
    # Who may start one with segments: where one deploys (dev: data scientists); viewers and outsiders not.
    assert api_as(personas["viewer"]).post("/api/v1/experiments/", {**body, "segment_column": "region"},
                                           format="json").status_code == 403
    assert api_as(personas["outsider"]).post("/api/v1/experiments/", {**body, "segment_column": "region"},
                                             format="json").status_code == 404
    started = client.post("/api/v1/experiments/", {**body, "segment_column": "region"}, format="json")
    assert started.status_code == 201 and started.json()["segment_column"] == "region"


def test_a_references_rest_bucket_is_not_counted_as_a_category() -> None:
    """A profile keeps its most common values and counts the rest as ``__other__``: twenty named values and the rest
    are twenty categories, which may be analysed per segment (the rest shows as its own row when seen)."""
    from monitoring.rollups import MAX_SEGMENTS, OTHER, FeatureSpec, segment_count

    named = frozenset(str(i) for i in range(MAX_SEGMENTS))
    assert segment_count(FeatureSpec("plan", 0, "categorical", categories=named | {OTHER})) == MAX_SEGMENTS
    assert segment_count(FeatureSpec("plan", 0, "categorical", categories=named | {"x", OTHER})) == MAX_SEGMENTS + 1
