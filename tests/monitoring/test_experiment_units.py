"""The sample-ratio check counts units (routing keys, subjects; a keyless request is its own unit), not requests:
predictions logged the way the flusher writes them, rolled up by the portal's roll-up, analysed by the experiment's
stop rule. A few heavy users must not fake a mismatch (nor hide a real one), a real 52/48 split of units is caught,
and a unit is counted once whatever order its minutes are rolled up in."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from monitoring.experiments import stats
from monitoring.experiments.models import ExperimentUnit, Verdict
from monitoring.experiments.services import experiment_evaluate
from monitoring.flush import write_batches
from monitoring.models import PredictionLog
from monitoring.rollups import rollup_dirty, rollup_range
from registry.models import ModelVersion
from registry.serving import runtime
from registry.serving.views import subject_hash
from tests.monitoring.conftest import reference_matrix
from tests.monitoring.test_experiments import LATER, after_start, history, start
from tests.registry.conftest import deploy_now

pytestmark = pytest.mark.django_db

VERSION_OF = {"champion": 1, "canary": 2}


@pytest.fixture
def split(two_versions: list[ModelVersion], personas: dict[str, Any]) -> list[ModelVersion]:
    """v1 the champion of churn in dev, v2 its canary on 50 % of requests."""
    deploy_now(two_versions[0], personas["ds"])
    deploy_now(two_versions[1], personas["ds"], strategy="canary", traffic_percent=50)
    return two_versions


def router(percent: int) -> runtime.Route:
    """The serving router's own assignment rule (sticky by key), on stand-in sides."""
    sides: Any = (("champion", None), ("canary", None))
    return runtime.Route(generation=1, champion=sides[0], challenger=sides[1], mode="canary",
                         challenger_percent=percent, checked_at=0.0)


def requests_batches(assignments: list[tuple[str, str, int]], at: dt.datetime, seed: int = 0) -> list[dict[str, Any]]:
    """For each ``(role, unit key, requests)``: that many one-row requests, logged as serving logs them (the unit is
    the key's keyed hash; an empty key is a keyless request), spread over the minute after ``at``."""
    _columns, X, _y = reference_matrix()
    rng = np.random.default_rng(seed)
    batches = []
    for role, key, count in assignments:
        for _ in range(count):
            batches.append({"model": "churn", "environment": "dev", "version": VERSION_OF[role], "role": role,
                            "ts": at.timestamp() + float(rng.random()) * 50, "latency_ms": 2.0,
                            "request_id": os.urandom(8).hex(), "error": "", "ids": [os.urandom(16).hex()],
                            "inputs": [X[int(rng.integers(0, len(X)))].tolist()], "outputs": [1], "subjects": None,
                            "unit": subject_hash(key) if key else ""})
    return batches


def test_heavy_users_do_not_fake_a_sample_ratio_mismatch(split: list[ModelVersion], personas: dict[str, Any],
                                                         log_rows: Callable[..., list[str]]) -> None:
    model = split[0].model
    history(log_rows, personas, model)
    experiment = start(personas, model, mde=0.2)
    now = after_start()
    route = router(50)
    users = [(route.pick(f"user-{i}")[0], f"user-{i}", 1) for i in range(1500)]
    # Five heavy users the router put on the challenger's side send 120 requests each; 300 keyless requests are
    # split evenly.
    heavy = [u for u in users if u[0] == "canary"][:5]
    traffic = [u for u in users if u not in heavy] + [(role, key, 120) for role, key, _n in heavy]
    traffic += [("canary" if i % 2 else "champion", "", 1) for i in range(300)]
    write_batches(requests_batches(traffic, now))
    rollup_dirty()
    experiment = experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert experiment is not None
    srm = experiment.analysis["srm"]
    keyed = [sum(1 for role, _k, _n in users if role == r) for r in ("champion", "canary")]
    anonymous = [sum(1 for role, key, _n in traffic if not key and role == r) for r in ("champion", "canary")]
    assert srm["keyed_units"] == keyed and srm["anonymous_requests"] == anonymous
    assert srm["units"] == [keyed[0] + anonymous[0], keyed[1] + anonymous[1]]
    assert not srm["mismatch"] and experiment.verdict != Verdict.INVALID
    # Counted by request, the same traffic would have been declared broken.
    assert srm["requests"][1] - srm["units"][1] == 5 * 119
    assert stats.srm_p_value(srm["requests"], [0.5, 0.5]) < stats.SRM_P
    assert ExperimentUnit.objects.filter(experiment=experiment).count() == 1500
    assert PredictionLog.objects.filter(unit_hash=subject_hash(heavy[0][1])).count() == 120


def test_a_real_52_48_split_of_units_is_caught_even_when_requests_look_even(
        split: list[ModelVersion], personas: dict[str, Any], log_rows: Callable[..., list[str]]) -> None:
    model = split[0].model
    history(log_rows, personas, model)
    experiment = start(personas, model, mde=0.2)
    now = after_start()
    # 10,000 users, 5,200 of them on the champion: assignment is broken. Four challenger users send 101 requests
    # each, which evens the request counts out (5,200 against 4,796 + 404).
    traffic = [("champion", f"user-{i}", 1) for i in range(5200)]
    traffic += [("canary", f"user-{i}", 101 if i < 5204 else 1) for i in range(5200, 10_000)]
    write_batches(requests_batches(traffic, now, seed=3))
    rollup_dirty()
    experiment = experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert experiment is not None
    srm = experiment.analysis["srm"]
    assert srm["units"] == [5200, 4800] and srm["requests"] == [5200, 5200]
    assert stats.srm_p_value(srm["requests"], [0.5, 0.5]) > 0.5, "by request the mismatch would hide"
    assert srm["mismatch"] and srm["p_value"] < 1e-4
    assert experiment.verdict == Verdict.INVALID
    assert "assigned 48.0% of 10,000 users" in experiment.verdict_sentence


def test_a_unit_is_counted_once_in_the_arm_of_its_first_request_whatever_the_roll_up_order(
        split: list[ModelVersion], personas: dict[str, Any], log_rows: Callable[..., list[str]]) -> None:
    model = split[0].model
    history(log_rows, personas, model)
    experiment = start(personas, model, mde=0.2)
    first = after_start().replace(second=0)
    minutes = [first + dt.timedelta(minutes=m) for m in range(3)]
    # One user on each side sends in three minutes; the later minutes are rolled up first, then all again.
    for minute in minutes:
        write_batches(requests_batches([("champion", "ann", 2), ("canary", "bob", 3)], minute + dt.timedelta(
            seconds=1)))
    for minute in reversed(minutes):
        rollup_range("churn", "dev", minute, minute + dt.timedelta(minutes=1))
    rollup_dirty()
    units = {u.unit_hash: u for u in ExperimentUnit.objects.filter(experiment=experiment)}
    assert set(units) == {subject_hash("ann"), subject_hash("bob")}
    assert units[subject_hash("ann")].arm == "champion" and units[subject_hash("bob")].arm == "challenger"
    earliest = PredictionLog.objects.filter(unit_hash=subject_hash("bob")).order_by("created_at").first()
    assert earliest is not None and units[subject_hash("bob")].first_seen == earliest.created_at
    experiment = experiment_evaluate(experiment_id=experiment.pk, now=minutes[-1] + LATER)
    assert experiment is not None
    assert experiment.analysis["srm"]["units"] == [1, 1] and experiment.analysis["srm"]["requests"] == [6, 9]


def test_an_erased_subjects_unit_leaves_the_log_and_stays_counted(
        split: list[ModelVersion], personas: dict[str, Any], log_rows: Callable[..., list[str]]) -> None:
    from monitoring.gdpr import subject_erase
    from monitoring.rollups import mark_dirty

    model = split[0].model
    history(log_rows, personas, model)
    experiment = start(personas, model, mde=0.2)
    now = after_start()
    batches = requests_batches([("champion", "ann", 3), ("canary", "bob", 2)], now)
    for batch in batches:  # sent with subject_ids, the first of which the router assigned by
        batch["subjects"] = [batch["unit"]]
    write_batches(batches)
    rollup_dirty()
    counted = experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert counted is not None and counted.analysis["srm"]["units"] == [1, 1]

    subject_erase(subject_id="ann", actor=personas["compliance"], reason="request 7")
    assert not PredictionLog.objects.filter(unit_hash=subject_hash("ann")).exists()
    assert PredictionLog.objects.filter(unit_hash="-").count() == 3
    assert not ExperimentUnit.objects.filter(unit_hash=subject_hash("ann")).exists()
    assert ExperimentUnit.objects.filter(experiment=experiment).count() == 2
    # Rolled up again, the erased requests are not recounted as keyless ones: the split still holds two users.
    mark_dirty([("churn", "dev", now)])
    rollup_dirty()
    again = experiment_evaluate(experiment_id=experiment.pk, now=now + LATER)
    assert again is not None
    assert again.analysis["srm"]["units"] == [1, 1] and again.analysis["srm"]["anonymous_requests"] == [0, 0]
