"""Density (issue 38): serving forms load on first use and are evicted least recently used within the process's
memory budget, never while a request is inside them; every cold load is timed for the deployment page and left out
of the live latency. Through the production entry point, with the three constant models of ``conftest``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from monitoring.flush import flush_predictions
from monitoring.models import PredictionLog
from portal import services as portal_services
from registry.models import ColdLoad, Deployment, ModelVersion, RegisteredModel
from registry.sandbox import hosts
from registry.serving import runtime
from tests.conftest import EntryPointClient
from tests.registry.conftest import rows
from tests.registry.endpoints.conftest import CONSTANT

pytestmark = pytest.mark.django_db


@pytest.fixture
def scorer(personas: dict[str, Any]) -> Client:
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="density", actor=personas["ds"])
    return EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")


def _score(client: Client, name: str) -> list[Any]:
    columns, data = rows(2)
    response = client.post(f"/api/v1/serve/{name}/dev/invocations",
                           json.dumps({"dataframe_split": {"columns": columns, "data": data}}),
                           content_type="application/json")
    assert response.status_code == 200, response.content
    return [round(p, 6) for p in response.json()["predictions"]]


def _loaded(name: str) -> runtime.LoadedModel:
    route = runtime.cache.route(RegisteredModel.objects.get(name=name).pk, "dev")
    assert route is not None and route.champion is not None
    return route.champion[1]


def test_under_a_tiny_budget_models_are_evicted_and_reloaded_and_every_answer_stays_right(
        three_models: dict[str, ModelVersion], scorer: Client, settings: Any) -> None:
    settings.PORTAL_SERVE_MEMORY_MB = 0  # nothing fits: each load evicts every other idle form
    ColdLoad.objects.all().delete()  # the deployments' own warm-up loads
    evictions = runtime.cache.evictions
    for _round in range(10):
        for name, value in CONSTANT.items():
            assert _score(scorer, name) == [value, value]
    assert runtime.cache.evictions - evictions >= 27  # every request after the first found another form loaded
    assert len(runtime.cache._models) == 1
    for version in three_models.values():
        deployment = Deployment.objects.get(version=version, environment="dev")
        loads = ColdLoad.objects.filter(deployment=deployment)
        assert loads.count() == 10 and {c.kind for c in loads} == {"onnx"}
        assert all(c.resident_bytes and c.resident_bytes > 0 for c in loads)
    while flush_predictions():
        pass
    logged = PredictionLog.objects.filter(model_name__in=list(CONSTANT), environment="dev")
    assert logged.count() == 60 and {round(r.output, 6) for r in logged} == set(CONSTANT.values())


def test_a_model_with_a_request_inside_is_never_evicted(three_models: dict[str, ModelVersion], scorer: Client,
                                                        settings: Any) -> None:
    settings.PORTAL_SERVE_MEMORY_MB = 0
    assert _score(scorer, "alpha") == [1.0, 1.0]
    alpha = _loaded("alpha")
    assert alpha.enter()  # a request is inside alpha (as the scoring view holds its slot while it predicts)
    try:
        assert alpha.busy
        assert _score(scorer, "beta") == [2.0, 2.0]
        assert _score(scorer, "gamma") == [3.0, 3.0]
        assert alpha in runtime.cache._models.values()  # passed over, twice: the process is over budget meanwhile
        _columns, data = rows(2)
        import numpy as np

        assert [round(p, 6) for p in alpha.predict(np.asarray(data, dtype="float64"))] == [1.0, 1.0]
    finally:
        alpha.leave()
    assert _score(scorer, "beta") == [2.0, 2.0]  # the next load finds alpha idle, and it goes
    assert alpha not in runtime.cache._models.values()
    assert _score(scorer, "alpha") == [1.0, 1.0]  # and it comes back on its next request


def test_a_busy_sandboxed_host_is_never_stopped_to_make_room(settings: Any, monkeypatch: Any) -> None:
    """The host pool's cap and the serving cache's eviction both pass over a host whose lock a request holds."""
    settings.PORTAL_MODEL_HOSTS_PER_PROCESS = 1
    pool = hosts.HostPool()
    monkeypatch.setattr(pool, "_ensure_reaper", lambda: None)
    stopped: list[str] = []
    busy = pool.get("busy", lambda work: ("joblib", work, {}), label="busy")
    idle = pool.get("idle", lambda work: ("joblib", work, {}), label="idle")
    for host in (busy, idle):
        monkeypatch.setattr(type(host), "running", property(lambda h: h.key not in stopped))
        monkeypatch.setattr(host, "stop", lambda h=host: stopped.append(h.key))
    assert busy._lock.acquire(blocking=False)  # a request is inside "busy"
    try:
        assert pool.stop_idle("busy") is False and stopped == []
        pool.get("third", lambda work: ("joblib", work, {}), label="third")
        assert stopped == ["idle"]  # over the cap of one: the idle host went, the busy one stayed
    finally:
        busy._lock.release()
    assert pool.stop_idle("busy") is True and stopped == ["idle", "busy"]


def test_the_deployment_page_shows_the_last_and_median_cold_load(three_models: dict[str, ModelVersion],
                                                                 scorer: Client, personas: dict[str, Any],
                                                                 settings: Any) -> None:
    settings.PORTAL_SERVE_MEMORY_MB = 0
    for _round in range(3):
        for name in CONSTANT:
            _score(scorer, name)
    deployment = Deployment.objects.get(version=three_models["beta"], environment="dev")
    viewer = Client()
    viewer.force_login(personas["viewer"])
    page = viewer.get(f"/deployments/{deployment.uid}/").content.decode()
    assert 'data-testid="cold-last"' in page and 'data-testid="cold-median"' in page
    assert "left out of the live latency" in page
