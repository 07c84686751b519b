"""Deployments carried out by real worker processes: no failed request during a switch, and a worker killed
mid-deployment leaves it finished once, never stuck."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from portal import services as portal_services
from registry.models import Deployment, ModelVersion
from registry.serving import runtime
from tests.conftest import wait_for
from tests.registry.conftest import rows as _rows

pytestmark = pytest.mark.slow


def _deploy_over_api(live_server: Any, token: str, number: int) -> str:
    response = requests.post(f"{live_server.url}/api/v1/models/churn/versions/{number}/deploy",
                             json={"environment": "dev"}, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _status(live_server: Any, token: str, uid: str) -> dict[str, Any]:
    return requests.get(f"{live_server.url}/api/v1/deployments/{uid}/", headers={"Authorization": f"Bearer {token}"},
                        timeout=30).json()


@contextlib.contextmanager
def continuous_traffic(live_server: Any, token: str, env: str = "dev") -> Iterator[list[tuple[int, int | None]]]:
    """Requests sent back to back from a thread while the block runs: (status, version that answered)."""
    columns, rows = _rows(2)
    results: list[tuple[int, int | None]] = []
    stop = threading.Event()

    def traffic() -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        while not stop.is_set():
            r = session.post(f"{live_server.url}/api/v1/serve/churn/{env}/invocations",
                             json={"dataframe_split": {"columns": columns, "data": rows}}, timeout=30)
            results.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else None))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        yield results
    finally:
        stop.set()
        thread.join(timeout=30)


def test_switching_versions_under_continuous_requests_fails_none(
        live_server: Any, worker_factory: Any, two_versions: list[ModelVersion], personas: dict[str, Any]) -> None:
    runtime.cache.clear()
    worker_factory()
    _t, token = portal_services.token_create(user=personas["ds"], name="ci", actor=personas["ds"])
    first = _deploy_over_api(live_server, token, 1)
    wait_for(lambda: _status(live_server, token, first)["status"] == "live", timeout=120, what="v1 live")

    with continuous_traffic(live_server, token) as results:
        wait_for(lambda: len(results) > 20, what="traffic")
        second = _deploy_over_api(live_server, token, 2)
        wait_for(lambda: _status(live_server, token, second)["status"] == "live", timeout=120, what="v2 live")
        time.sleep(1.5)  # past the route refresh interval
    statuses = {s for s, _ in results}
    versions = [v for _, v in results]
    assert statuses == {200}, f"failed requests during the switch: {[r for r in results if r[0] != 200][:5]}"
    assert versions[0] == 1 and versions[-1] == 2
    switch = versions.index(2)
    assert set(versions[switch:]) == {2}, "once switched, no request went back to the old version"
    assert Deployment.objects.get(uid=first).status == "retired"


def test_a_worker_killed_mid_deployment_leaves_it_finished_once(
        live_server: Any, worker_factory: Any, two_versions: list[ModelVersion], personas: dict[str, Any]) -> None:
    _t, token = portal_services.token_create(user=personas["ds"], name="ci", actor=personas["ds"])
    doomed = worker_factory(PORTAL_CELERY_VISIBILITY_TIMEOUT="5")
    uid = _deploy_over_api(live_server, token, 1)
    wait_for(lambda: Deployment.objects.get(uid=uid).progress >= 30, timeout=60, interval=0.05,
             what="the deployment to start preparing")
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=30)
    assert Deployment.objects.get(uid=uid).status == "running"
    worker_factory(PORTAL_CELERY_VISIBILITY_TIMEOUT="5")
    final = wait_for(lambda: (d := Deployment.objects.get(uid=uid)).status in ("live", "failed") and d,
                     timeout=180, what="the redelivered deployment to finish")
    assert final.status == "live", final.error
    assert final.attempts == 2
    assert any("previous worker stopped" in entry["message"] for entry in final.log)
    from portal.models import AuditEvent

    assert AuditEvent.objects.filter(action="deployment.live", target_id=uid).count() == 1


def test_a_rollback_under_continuous_requests_restores_the_earlier_version_and_fails_none(
        live_server: Any, worker_factory: Any, two_versions: list[ModelVersion], personas: dict[str, Any]) -> None:
    runtime.cache.clear()
    worker_factory()
    _t, token = portal_services.token_create(user=personas["ds"], name="ci", actor=personas["ds"])
    for number in (1, 2):
        uid = _deploy_over_api(live_server, token, number)
        wait_for(lambda uid=uid: _status(live_server, token, uid)["status"] == "live", timeout=120,
                 what=f"v{number} live")
    with continuous_traffic(live_server, token) as results:
        wait_for(lambda: len(results) > 20 and results[-1][1] == 2, what="traffic on v2")
        response = requests.post(f"{live_server.url}/api/v1/models/churn/environments/dev/rollback",
                                 json={"reason": "v2 answers oddly"}, headers={"Authorization": f"Bearer {token}"},
                                 timeout=30)
        assert response.status_code == 202, response.text
        assert response.json()["version"] == 1
        uid = response.json()["id"]
        wait_for(lambda: _status(live_server, token, uid)["status"] == "live", timeout=120, what="rollback live")
        time.sleep(1.5)
    assert {s for s, _ in results} == {200}, [r for r in results if r[0] != 200][:5]
    versions = [v for _, v in results]
    back = max(i for i, v in enumerate(versions) if v == 2) + 1
    assert versions[back:] and set(versions[back:]) == {1}, "after the rollback only v1 answers"
    assert Deployment.objects.get(uid=uid).purpose == "rollback"
