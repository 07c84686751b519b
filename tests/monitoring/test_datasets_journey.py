"""The loop closed end to end on PostgreSQL, Redis and a real Celery worker: traffic with subject ids and ground truth,
a drift alert, the retraining policy cutting a snapshot, a signed call to a CI receiver whose token downloads exactly
that snapshot and nothing else, a version registered as trained on it (shown both ways), and an erasure that removes
the subject's rows from the snapshot, marks the version and names both in its receipt."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from django.conf import settings as django_settings
from django.test import Client
from rest_framework.test import APIClient

from monitoring.alerts import evaluate_alerts
from monitoring.datasets.retraining import retraining_sync
from monitoring.datasets.tasks import retraining_evaluate_task
from monitoring.flush import flush_predictions
from monitoring.models import Alert, Feedback, PredictionLog, RetrainingRequest
from monitoring.rollups import rollup_dirty
from portal.models import Team, TeamWebhook, WebhookDelivery
from registry.serving.views import subject_hash
from tests.conftest import ROOT, wait_for
from tests.registry import files
from tests.registry.conftest import serving  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "ci-secret-" + "x" * 22
SUBJECTS = [f"patient-{i}" for i in range(5)]


class _CI(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # the stdlib names it
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((dict(self.headers), body))
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def ci_receiver(settings: Any) -> Iterator[tuple[int, type[_CI]]]:
    _CI.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CI)
    port = server.server_address[1]
    settings.PORTAL_WEBHOOK_ALLOW_HTTP = True
    settings.PORTAL_WEBHOOK_PORTS = (443, 8443, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port, _CI
    server.shutdown()


@pytest.fixture
def ci_worker(worker_factory: Callable[..., subprocess.Popen[bytes]], ci_receiver: tuple[int, type[_CI]]
              ) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker on this test's private queue (``worker_factory`` routes our ``.delay()`` calls there) whose
    DNS sends ci.example.com to the local receiver."""
    db = django_settings.DATABASES["default"]
    queue = str(worker_factory.queue)  # type: ignore[attr-defined]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PORTAL_CELERY_QUEUE": queue,
           "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
           "PORTAL_WEBHOOK_ALLOW_HTTP": "1", "PORTAL_WEBHOOK_PORTS": f"443,8443,{ci_receiver[0]}"}
    proc = subprocess.Popen([sys.executable, "tests/monitoring/ci_worker.py", "-A", "config", "worker", "--pool",
                             "solo", "--loglevel", "WARNING", "-Q", queue, "--without-heartbeat", "--without-gossip",
                             "--without-mingle", "-n", f"ci-{queue}@%h"], cwd=ROOT, env=env, start_new_session=True)
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_drift_to_retraining_to_lineage_to_erasure(serving: Client, personas: dict[str, Any], api_as: Any,  # noqa: F811
                                                   ci_receiver: tuple[int, type[_CI]],
                                                   ci_worker: subprocess.Popen[bytes], tmp_path: Path) -> None:
    port, ci = ci_receiver
    X, y = files._data()
    # Production traffic three times the reference's scale (drift), with subject ids, then its ground truth.
    ids: list[str] = []
    for start in (0, 150):
        rows = (X.iloc[start:start + 150] * 3.0)
        body = {"dataframe_split": {"columns": list(X.columns), "data": rows.to_numpy().tolist()},
                "subject_ids": [SUBJECTS[i % len(SUBJECTS)] for i in range(start, start + 150)]}
        response = serving.post("/api/v1/serve/churn/dev/invocations", json.dumps(body),
                                content_type="application/json")
        assert response.status_code == 200, response.content
        ids += response.json()["prediction_ids"]
    flush_predictions()
    ds = api_as(personas["ds"])
    truth = [{"prediction_id": pid, "actual": int(y.iloc[i])} for i, pid in enumerate(ids)]
    assert ds.post("/api/v1/serve/churn/dev/feedback", truth, format="json").json()["accepted"] == 300
    rollup_dirty()
    evaluate_alerts()
    alert = Alert.objects.get(kind="drift")

    hook = TeamWebhook.objects.create(team=Team.objects.get(slug="acme"), url=f"http://ci.example.com:{port}/retrain",
                                      secret=SECRET, events=["retraining.requested"])
    policy = ds.put("/api/v1/models/churn/environments/dev/retraining-policy",
                    {"on_drift": True, "snapshot_days": 1, "webhook": hook.pk}, format="json")
    assert policy.status_code == 200, policy.content

    retraining_evaluate_task.delay()
    wait_for(lambda: ci.received, timeout=180, what="the signed call to CI")
    headers, body = ci.received[0]
    expected = hmac.new(SECRET.encode(), headers["X-Portal-Timestamp"].encode() + b"." + body, hashlib.sha256)
    assert headers["X-Portal-Signature"] == f"sha256={expected.hexdigest()}"
    call = json.loads(body)
    request = RetrainingRequest.objects.get()
    assert (call["event"], call["trigger"], request.alert_id) == ("retraining.requested", "drift", alert.pk)
    assert call["snapshot"]["id"] == str(request.snapshot.uid) and call["token"].startswith("mld_")

    # The token downloads exactly that snapshot, and nothing else.
    ci_client = APIClient(HTTP_AUTHORIZATION=f"Bearer {call['token']}")
    download = ci_client.get(call["snapshot"]["url"].removeprefix(django_settings.PORTAL_BASE_URL))
    assert download.status_code == 200 and download["X-Content-SHA256"] == call["snapshot"]["sha256"]
    table = pq.read_table(io.BytesIO(b"".join(download.streaming_content))).to_pandas()
    for path in (f"/api/v1/datasets/{uuid.uuid4()}/download", f"/api/v1/datasets/{call['snapshot']['id']}/",
                 "/api/v1/models/churn/", "/api/v1/datasets/"):
        assert ci_client.get(path).status_code in (401, 404), path

    # The snapshot's rows are the log joined with its ground truth.
    log = {p.id: p for p in PredictionLog.objects.filter(id__in=ids)}
    actual = dict(Feedback.objects.filter(prediction_id__in=ids).values_list("prediction_id", "actual"))
    assert sorted(table["prediction_id"]) == sorted(ids)
    for row in table.itertuples():
        assert row.subject_hash == log[row.prediction_id].subject_hash
        assert row.actual == float(actual[row.prediction_id]) and row.prediction == float(log[row.prediction_id].output)
    assert set(table["subject_hash"]) == {subject_hash(s) for s in SUBJECTS}

    wait_for(lambda: WebhookDelivery.objects.filter(status="delivered").exists(), what="the delivery log")
    retraining_sync()
    assert RetrainingRequest.objects.get().status == "called"

    # A version trained on it: the link shows both ways, and the request is done.
    path = files.joblib_file(tmp_path / "retrained.joblib", files.logistic_regression())
    with open(path, "rb") as fh:
        uploaded = ds.post("/api/v1/models/churn/versions/", {"file": fh, "trained_on": call["snapshot"]["id"]},
                           format="multipart")
    assert uploaded.status_code == 201, uploaded.content
    number = uploaded.json()["number"]
    assert [v["version"] for v in ds.get(f"/api/v1/datasets/{call['snapshot']['id']}/").json()[
        "trained_versions"]] == [number]
    assert ds.get(f"/api/v1/models/churn/versions/{number}/lineage").json()["trained_on"][0]["snapshot"] == \
        call["snapshot"]["id"]
    assert RetrainingRequest.objects.get().status == "done"
    browser = Client()
    browser.force_login(personas["ds"])
    assert call["snapshot"]["id"] in browser.get(f"/models/churn/versions/{number}/").content.decode()
    assert f"/models/churn/versions/{number}/" in browser.get(f"/datasets/{call['snapshot']['id']}/").content.decode()

    # Erasing one subject removes their rows from the snapshot, marks the version, and the receipt names both.
    receipt = api_as(personas["compliance"]).post("/api/v1/gdpr/erasure", {"subject_id": SUBJECTS[2]},
                                                  format="json").json()
    [rewritten] = receipt["training_data"]["snapshots"]
    assert rewritten["snapshot"] == call["snapshot"]["id"] and rewritten["rows_removed"] == 60
    assert [(v["model"], v["version"]) for v in receipt["training_data"]["versions_flagged"]] == [("churn", number)]
    after = ds.get(f"/api/v1/datasets/{call['snapshot']['id']}/download")
    table = pq.read_table(io.BytesIO(b"".join(after.streaming_content))).to_pandas()
    assert len(table) == 240 and subject_hash(SUBJECTS[2]) not in set(table["subject_hash"])
    assert after["X-Content-SHA256"] == rewritten["new_sha256"] != call["snapshot"]["sha256"]
    assert ds.get(f"/api/v1/models/churn/versions/{number}/lineage").json()["trained_on_erased_data"] is True
    assert "Trained on erased data" in browser.get(f"/models/churn/versions/{number}/").content.decode()
