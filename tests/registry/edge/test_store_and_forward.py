"""Store and forward: a device predicts while the portal is out of reach, keeps its predictions, uploads them once the
portal answers, and sends them again when it could not know they arrived; the prediction log holds each once, with
its inputs and output, under the model, version and role ``edge``. A device token uploads for its own model only."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from monitoring.flush import drain
from monitoring.models import PredictionLog
from portal.models import AuditEvent, Team
from registry.edge import services as edge
from registry.models import EdgeDeviceToken, ModelVersion
from registry.versions import services as version_services
from tests.conftest import free_port
from tests.registry.edge.conftest import edge_data
from tests.registry.edge.test_edge_packages import _build_in_process, _package_folder, rows_json, runner

pytestmark = pytest.mark.django_db(transaction=True)


def _upload(python: Path, package: Path, url: str, token: str) -> tuple[int, dict[str, Any]]:
    result = runner(python, package, "upload", "--url", url, "--token", token)
    return result.returncode, json.loads(result.stdout.splitlines()[0]) if result.stdout else {}


def test_predictions_kept_offline_are_logged_once_each_after_an_outage_and_a_resend(
        live_server: Any, edge_lr: ModelVersion, personas: dict[str, Any], bare_python: Path,
        tmp_path: Path) -> None:
    package = _build_in_process(edge_lr, personas)
    assert package.status == "ready", package.error
    folder = _package_folder(package, tmp_path / "device")
    _token, plaintext = edge.device_token_create(model=edge_lr.model, name="shop floor", environment="prod",
                                                 actor=personas["ds"])

    ids: list[str] = []
    for start in (0, 5):  # two runs on the device, while the portal is out of reach
        _rows, body = rows_json(5, start)
        result = runner(bare_python, folder, "-", stdin=body)
        assert result.returncode == 0, result.stderr
        ids += json.loads(result.stdout)["prediction_ids"]
    assert len(set(ids)) == 10 and len(list((folder / "outbox").glob("*.jsonl"))) == 2

    code, report = _upload(bare_python, folder, f"http://127.0.0.1:{free_port()}", plaintext)
    assert code == 3 and report["pending_files"] == 2, report  # unreachable: everything stays on the device
    assert len(list((folder / "outbox").glob("*.jsonl"))) == 2

    code, report = _upload(bare_python, folder, live_server.url, plaintext)
    assert code == 0 and report["records"] == 10, report
    assert not list((folder / "outbox").glob("*.jsonl"))
    # The answer to that upload never reached the device: it sends the same runs again.
    for sent in (folder / "sent").glob("*.jsonl"):
        shutil.move(sent, folder / "outbox" / sent.name)
    code, report = _upload(bare_python, folder, live_server.url, plaintext)
    assert code == 0 and report["records"] == 10, report

    drain(timeout=30)
    logged = PredictionLog.objects.filter(model_name="edge-lr")
    assert sorted(logged.values_list("id", flat=True)) == sorted(ids), "each prediction once, by the device's id"
    assert set(logged.values_list("role", "environment", "version")) == {("edge", "prod", 1)}
    kept = [json.loads(line) for f in (folder / "sent").glob("*.jsonl") for line in f.read_text().splitlines()]
    by_id = {r["id"]: r for r in kept}
    for row in logged:
        assert row.output == by_id[row.id]["output"] and row.inputs == by_id[row.id]["inputs"]
    token = EdgeDeviceToken.objects.get(model=edge_lr.model)
    assert token.last_report_at is not None and token.records_received == 20  # received twice, logged once


def test_a_device_token_uploads_for_its_own_model_only(edge_lr: ModelVersion, personas: dict[str, Any]) -> None:
    package = _build_in_process(edge_lr, personas)
    assert package.status == "ready", package.error
    other = version_services.model_register(name="other-model", team=Team.objects.get(slug="acme"),
                                            actor=personas["ds"])
    _t, plaintext = edge.device_token_create(model=edge_lr.model, name="fleet", actor=personas["ds"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    X, _y = edge_data()
    record = {"id": "a" * 32, "version": 1, "ts": time.time(), "latency_ms": 0.2,
              "inputs": X.iloc[0].tolist(), "output": 1}

    answer = client.post("/api/v1/edge/uploads", {"model": other.name, "records": [record]}, format="json")
    assert answer.status_code == 404
    assert AuditEvent.objects.filter(action="edge.upload_refused", target_id=other.name).count() == 1

    bad = client.post("/api/v1/edge/uploads", {"model": "edge-lr", "records": [
        record, {**record, "id": "b" * 32, "inputs": [1.0]}]}, format="json")
    assert bad.status_code == 400 and "record 1" in bad.content.decode()
    assert client.post("/api/v1/edge/uploads", {"model": "edge-lr", "records": [{**record, "version": 7}]},
                       format="json").status_code == 400
    drain(timeout=10)
    assert not PredictionLog.objects.filter(id="a" * 32).exists(), "a refused upload writes nothing"

    user_token = APIClient()
    user_token.force_authenticate(personas["ds"])
    assert user_token.post("/api/v1/edge/uploads", {"model": "edge-lr", "records": [record]},
                           format="json").status_code in (401, 403)
    token = EdgeDeviceToken.objects.get(model=edge_lr.model)
    edge.device_token_revoke(token=token, actor=personas["ds"])
    assert client.post("/api/v1/edge/uploads", {"model": "edge-lr", "records": [record]},
                       format="json").status_code == 401
    assert AuditEvent.objects.filter(action__in=["edge.token_create", "edge.token_revoke"]).count() == 2
