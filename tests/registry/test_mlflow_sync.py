"""MLflow users change nothing (issue 34), proved against a real ``mlflow server`` (SQLite store, local artifacts) on
a free port, the portal's real HTTP server (pytest-django's live server: MLflow has to reach it), real Celery workers,
PostgreSQL and Redis:

- a script that only calls ``mlflow.sklearn.log_model(..., registered_model_name="churn")`` makes a ready portal
  version, with its run, params, metrics and logged-model id;
- a forged delivery (bad signature) is refused with a 401 and audited; a replayed genuine one is recognised;
- a version whose webhook never reached the portal (the portal unreachable when MLflow fired) is imported by the
  reconcile;
- after promotion to prod, ``mlflow.pyfunc.load_model("models:/churn@prod")`` loads the version serving prod.

MLflow refuses webhook URLs that resolve to private addresses and plain http by default; the server here is started
as an operator whose portal lives on the same private network would start it: ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS``
and ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`` (README, "Connecting MLflow").
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.fernet import Fernet

from portal.models import AuditEvent
from registry.mlflow_sync import services as mlflow_sync
from registry.mlflow_sync.tasks import mlflow_reconcile_task
from registry.models import MlflowConnection, MlflowSyncJob, ModelVersion, PromotionRequest
from registry.promotions import services as promotions
from tests.conftest import PASSWORD, clean_env, free_port, needs_sandbox, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, needs_sandbox()]

CONNECT = "/api/v1/integrations/mlflow/connections"

LOG_MODEL = textwrap.dedent("""
    import json, sys, warnings
    import mlflow, mlflow.sklearn, numpy as np, pandas as pd
    from sklearn.linear_model import LogisticRegression
    warnings.simplefilter("ignore")
    mlflow.set_tracking_uri(sys.argv[1])
    rng = np.random.default_rng(int(sys.argv[2]))
    X = pd.DataFrame(rng.normal(size=(200, 4)), columns=["tenure", "spend", "calls", "age"])
    y = (X["tenure"] - X["calls"] > 0).astype(int)
    with mlflow.start_run(run_name="churn-" + sys.argv[2]) as run:
        mlflow.log_params({"C": "1.0", "seed": sys.argv[2]})
        model = LogisticRegression(C=1.0).fit(X, y)
        mlflow.log_metric("accuracy", float(model.score(X, y)))
        info = mlflow.sklearn.log_model(model, name="model", input_example=X.head(3), registered_model_name="churn")
    print(json.dumps({"run_id": run.info.run_id, "model_id": info.model_id,
                      "version": str(info.registered_model_version)}))
""")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-sync-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = clean_env(MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true", MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
                    MLFLOW_WEBHOOK_CACHE_TTL="1", MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=Fernet.generate_key().decode())
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"),
        start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a loaded machine: MLflow's server takes a minute or more to start
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.3)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def log_model(uri: str, seed: int) -> dict[str, str]:
    """What a data scientist runs: nothing but MLflow (a separate process, no portal code)."""
    done = subprocess.run([sys.executable, "-c", LOG_MODEL, uri, str(seed)], capture_output=True, text=True,
                          timeout=180, env=clean_env(MLFLOW_TRACKING_URI=uri))
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_mlflow_registry_and_portal_stay_in_step(mlflow_server: str, live_server: Any, worker_factory: Any,
                                                personas: dict[str, Any], api_as: Any, settings: Any) -> None:
    from mlflow import MlflowClient

    worker_factory()
    admin = api_as(personas["admin"])
    # One command (the CLI and the client call this endpoint) registers the webhook through MLflow's client.
    answer = admin.post(CONNECT, {"tracking_uri": mlflow_server, "team": "acme", "portal_url": live_server.url},
                        format="json")
    assert answer.status_code == 201, answer.content
    connection = MlflowConnection.objects.get(uid=answer.json()["id"])
    hooks = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server).list_webhooks()
    assert [h.webhook_id for h in hooks] == [connection.webhook_id]
    assert {str(e) for e in hooks[0].events} == {"model_version.created", "model_version_alias.created"}
    assert mlflow_sync.connection_secret(connection) not in connection.secret_encrypted  # stored encrypted
    assert AuditEvent.objects.filter(action="mlflow.connect", target_id=str(connection.uid)).exists()

    # 1. log_model with registered_model_name, nothing else: a ready portal version. How fast is printed, not
    # asserted (speed is measured, never asserted: the 30 s holds on an idle machine, see the report).
    first = log_model(mlflow_server, 1)
    logged_at = time.monotonic()
    version = wait_for(lambda: ModelVersion.objects.filter(model__name="churn", status="ready").first(),
                       timeout=180, interval=0.25, what=lambda: (
                           "churn v1 ready in the portal; jobs: "
                           f"{list(MlflowSyncJob.objects.values('status', 'error', 'attempts'))}, versions: "
                           f"{list(ModelVersion.objects.values('number', 'status', 'status_detail'))}, deliveries "
                           f"received: {AuditEvent.objects.filter(action='mlflow.webhook_receive').count()}, refused: "
                           f"{list(AuditEvent.objects.filter(action='mlflow.webhook_refuse').values('metadata'))}"))
    print(f"log_model returned -> portal version ready: {time.monotonic() - logged_at:.1f} s")
    body = admin.get(f"/api/v1/models/churn/versions/{version.number}/").json()
    assert body["mlflow_source"]["run_id"] == first["run_id"]
    assert body["mlflow_source"]["logged_model_id"] == first["model_id"]
    assert body["mlflow_source"]["registered_version"] == first["version"]
    assert body["params"] == {"C": "1.0", "seed": "1"} and "accuracy" in body["metrics"]
    job = MlflowSyncJob.objects.get(connection=connection, kind="import", mlflow_version=first["version"])
    assert job.status == "done" and job.origin == "webhook" and job.version_id == version.pk

    # 2. A forged delivery: refused through the real entry point, and audited; nothing queued.
    payload = json.dumps({"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00",
                          "data": {"name": "churn", "version": "99", "source": "models:/m-0", "run_id": None,
                                   "tags": {}, "description": None}})
    stamp, delivery = str(int(time.time())), str(uuid.uuid4())
    url = f"{live_server.url}{mlflow_sync.WEBHOOK_PATH}?connection={connection.uid}"
    forged = requests.post(url, data=payload, timeout=10, headers={
        "Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": mlflow_sync.signature("not-the-secret", delivery, stamp, payload.encode())})
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "bad_signature", forged.content
    refused = AuditEvent.objects.get(action="mlflow.webhook_refuse")
    assert refused.metadata["reason"] == "bad signature" and refused.outcome == "failure"
    assert not MlflowSyncJob.objects.filter(mlflow_version="99").exists()
    # The same delivery genuinely signed but replayed for version 1: recognised, no second import.
    genuine = json.dumps({"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00",
                          "data": {"name": "churn", "version": first["version"]}})
    again = requests.post(url, data=genuine, timeout=10, headers={
        "Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": mlflow_sync.signature(mlflow_sync.connection_secret(connection), delivery, stamp,
                                                    genuine.encode())})
    assert again.status_code == 200 and again.json()["duplicate"] is True, again.content

    # 3. The portal unreachable when MLflow fires (the webhook pointed at a port nothing listens on): the delivery
    # is lost, and the periodic reconcile imports the version later.
    MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server).update_webhook(connection.webhook_id, url=f"http://127.0.0.1:{free_port()}/down")
    second = log_model(mlflow_server, 2)
    time.sleep(2)
    assert not MlflowSyncJob.objects.filter(mlflow_version=second["version"]).exists()
    MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server).update_webhook(connection.webhook_id, url=connection.webhook_url)
    mlflow_reconcile_task.delay()
    later = wait_for(lambda: ModelVersion.objects.filter(model__name="churn", status="ready",
                                                         mlflow_source__registered_version=second["version"]).first(),
                     timeout=90, what="the reconcile's import")
    assert MlflowSyncJob.objects.get(mlflow_version=second["version"], kind="import").origin == "reconcile"

    # 4. Promotion to prod (through stage, two approvers, workers deploying): MLflow's @prod is what serves prod.
    for target in ("stage", "prod"):
        promotion = promotions.promotion_request(version=version, target=target, reason=f"ship to {target}",
                                                 actor=personas["ds"])
        for approver in [personas["approver1"], personas["approver2"]][: promotion.approvals_required]:
            promotion = promotions.promotion_decide(promotion=promotion, actor=approver, approve=True,
                                                    comment="looks right", password=PASSWORD)
        wait_for(lambda p=promotion: PromotionRequest.objects.get(pk=p.pk).status == "live", timeout=120,
                 what=f"{target} live")
    alias_job = wait_for(lambda: MlflowSyncJob.objects.filter(kind="alias", environment="prod", status="done").first(),
                         timeout=60, what="MLflow's prod alias set")
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    prod = client.get_model_version_by_alias("churn", "prod")
    assert prod.version == first["version"] != later.mlflow_source.registered_version
    assert prod.tags["portal.prod.approved_by"] == "alex,blair"
    event_id = prod.tags["portal.prod.audit_event"]
    assert AuditEvent.objects.get(pk=int(event_id)).action == "deployment.live"
    assert client.get_model_version_by_alias("churn", "stage").version == first["version"]
    assert AuditEvent.objects.filter(action="mlflow.alias_set", metadata__job=str(alias_job.uid)).exists()
    import mlflow
    import mlflow.pyfunc
    import pandas as pd

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    try:  # a notebook's line, against the team's tracking server
        loaded = mlflow.pyfunc.load_model("models:/churn@prod")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    assert loaded.metadata.model_id == first["model_id"] or loaded.metadata.run_id == first["run_id"]
    rows = pd.DataFrame([[0.5, 0.1, -0.4, 0.0], [-1.0, 0.3, 1.2, 0.5]], columns=["tenure", "spend", "calls", "age"])
    served = admin.post("/api/v1/serve/churn/prod/invocations",
                        {"dataframe_split": {"columns": list(rows.columns), "data": rows.values.tolist()}},
                        format="json")
    assert served.status_code == 200, served.content
    assert served.json()["predictions"] == loaded.predict(rows).tolist()
    assert served.json()["model_version"] == version.number


def test_the_reconcile_runs_on_beat() -> None:
    from django.conf import settings

    entry = settings.CELERY_BEAT_SCHEDULE["mlflow-reconcile"]
    assert entry["task"] == "registry.tasks.mlflow_reconcile" and entry["schedule"].total_seconds() <= 600
