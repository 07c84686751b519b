"""Import from a real ``mlflow server`` (started once for the module on a free port): every URI form, lineage kept
and shown, NaN metrics stored as missing, duplicates pointing at the existing version, and a tracking server that
does not answer giving a JSON 503 within seconds."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.test import Client, override_settings

from portal.models import AuditEvent, Team
from registry.models import ModelVersion
from registry.versions import services
from tests.conftest import assert_error_shape, clean_env, free_port, needs_sandbox
from tests.registry import files

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

IMPORT = "/api/v1/models/churn/versions/import"


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``mlflow server`` with a SQLite store, one run that logs params, a metric history, a NaN metric and a model
    registered as ``churn-lr`` version 1 with the alias ``champion``."""
    import mlflow
    import mlflow.sklearn
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=root, env=clean_env(), stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"),
        start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.3)
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            experiment = mlflow.create_experiment("churn-experiments")
            with warnings.catch_warnings(), mlflow.start_run(experiment_id=experiment, run_name="lr-baseline") as run:
                warnings.simplefilter("ignore")
                mlflow.log_params({"C": "1.0", "max_iter": "500"})
                for step, loss in enumerate([0.9, 0.5, 0.3]):
                    mlflow.log_metric("loss", loss, step=step)
                mlflow.log_metrics({"accuracy": 0.97, "auc": 0.99, "f1_minority": math.nan})
                mlflow.set_tag("mlflow.source.git.commit", "0badc0ffee12")
                mlflow.set_tag("team", "acme")
                X, _y = files._data()
                info = mlflow.sklearn.log_model(files.logistic_regression(), name="model", input_example=X.head(2),
                                                pip_requirements=["scikit-learn"], registered_model_name="churn-lr")
            MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias("churn-lr", "champion", "1")
        finally:
            mlflow.set_tracking_uri(previous)
            mlflow.set_registry_uri(previous)
        yield {"uri": uri, "run_id": run.info.run_id, "model_id": info.model_id, "experiment_id": experiment}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def churn(personas: dict[str, Any]) -> Any:
    return services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])


def test_every_uri_form_imports_once_with_its_lineage(tracking_server: dict[str, str], personas: dict[str, Any],
                                                      api_as: Any, client: Client, churn: Any) -> None:
    api = api_as(personas["ds"])
    with override_settings(PORTAL_MLFLOW_TRACKING_URI=tracking_server["uri"]):
        first = api.post(IMPORT, {"uri": "models:/churn-lr/1"}, format="json")
        assert first.status_code == 201, first.content
        body = first.json()
        assert body["duplicate_of_existing"] is False and body["number"] == 1 and body["format"] == "mlflow"
        assert body["lineage"]["mlflow_run_id"] == tracking_server["run_id"]
        assert body["lineage"]["git_commit"] == "0badc0ffee12" and body["lineage"]["source"] == "models:/churn-lr/1"
        # The NaN metric is stored as missing, not refused; the rest are the run's last values.
        assert body["metrics"] == {"accuracy": 0.97, "auc": 0.99, "loss": 0.3}
        assert body["params"] == {"C": "1.0", "max_iter": "500"} and len(body["signature"]["inputs"]) == 30
        source = body["mlflow_source"]
        # The version's own answer carries the same source (and a plain upload's is null).
        assert api.get("/api/v1/models/churn/versions/1/").json()["mlflow_source"] == source
        assert source["missing_metrics"] == ["f1_minority"] and source["metric_history"]["f1_minority"][0][2] is None
        assert [p[2] for p in source["metric_history"]["loss"]] == [0.9, 0.5, 0.3]
        assert source["tracking_uri"] == tracking_server["uri"] and source["run_name"] == "lr-baseline"
        assert source["experiment_name"] == "churn-experiments" and source["tags"]["team"] == "acme"
        assert source["logged_model_id"] == tracking_server["model_id"]
        assert source["run_url"] == (f"{tracking_server['uri']}/#/experiments/{tracking_server['experiment_id']}"
                                     f"/runs/{tracking_server['run_id']}")
        # Every other form resolves to the same files, so each answers version 1 instead of making a new version.
        for uri in ("models:/churn-lr@champion", "models:/churn-lr/latest", f"models:/{tracking_server['model_id']}",
                    f"runs:/{tracking_server['run_id']}/model"):
            again = api.post(IMPORT, {"uri": uri}, format="json")
            assert again.status_code == 200, (uri, again.content)
            assert again.json()["duplicate_of_existing"] is True and again.json()["number"] == 1, uri
        assert ModelVersion.objects.filter(model=churn).count() == 1
        duplicates = AuditEvent.objects.filter(action="version.import_duplicate")
        assert duplicates.count() == 4 and {e.metadata["uri"] for e in duplicates} >= {"models:/churn-lr/latest"}
        upload_event = AuditEvent.objects.get(action="version.upload")
        assert upload_event.after["mlflow"]["run_id"] == tracking_server["run_id"]

        # The page: import again (a duplicate, said so) and the version page showing the source.
        client.force_login(personas["ds"])
        assert b"models:/churn@champion" in client.get("/models/churn/upload").content
        response = client.post("/models/churn/import", {"uri": "models:/churn-lr@champion"}, follow=True)
        assert response.redirect_chain[-1][0] == "/models/churn/versions/1/"
        page = response.content.decode()
        assert "already version 1 of churn" in page
        assert f'href="{source["run_url"]}"' in page and "lr-baseline" in page and "churn-experiments" in page
        assert "max_iter" in page and "f1_minority" in page and 'data-testid="mlflow-metric-history"' in page
        assert client.post("/models/churn/import", {"uri": "nonsense"}).status_code == 302


@pytest.mark.parametrize("uri,words", [("models:/churn-lr/9", "could not provide"), ("models:/churn-lr@nope", "could not"),
                                       ("models:/nothing-here/latest", "has no versions"), ("s3://bucket/x", "Use models:/"),
                                       ("runs:/abc/../../etc", "Use models:/"), ("models:/churn-lr/1/../x", "Use")])
def test_bad_uris_are_explained(tracking_server: dict[str, str], personas: dict[str, Any], api_as: Any, churn: Any,
                                uri: str, words: str) -> None:
    with override_settings(PORTAL_MLFLOW_TRACKING_URI=tracking_server["uri"]):
        body = assert_error_shape(api_as(personas["ds"]).post(IMPORT, {"uri": uri}, format="json"), 400)
    assert words in body["error"]["message"]


def test_a_tracking_server_that_does_not_answer_is_a_json_503_within_seconds(personas: dict[str, Any], api_as: Any,
                                                                              client: Client, churn: Any) -> None:
    # A listening socket that never accepts: connections queue in the backlog and no answer ever comes.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    closed_port = free_port()
    try:
        for uri in (f"http://127.0.0.1:{silent.getsockname()[1]}", f"http://user:secret@127.0.0.1:{closed_port}"):
            started = time.monotonic()
            with override_settings(PORTAL_MLFLOW_TRACKING_URI=uri):
                response = api_as(personas["ds"]).post(IMPORT, {"uri": "models:/churn-lr/1"}, format="json")
            assert time.monotonic() - started < 10
            body = assert_error_shape(response, 503, "mlflow_unavailable")
            assert uri.replace("user:secret@", "") in body["error"]["message"] and "secret" not in str(body)
        client.force_login(personas["ds"])
        with override_settings(PORTAL_MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed_port}"):
            page = client.post("/models/churn/import", {"uri": "models:/churn-lr/1"}, follow=True).content.decode()
        assert "did not answer" in page
    finally:
        silent.close()
    assert not ModelVersion.objects.exists()


def test_import_is_refused_when_not_configured(personas: dict[str, Any], api_as: Any, churn: Any) -> None:
    body = assert_error_shape(api_as(personas["ds"]).post(IMPORT, {"uri": "models:/x/1"}, format="json"), 400)
    assert "PORTAL_MLFLOW_TRACKING_URI" in body["error"]["message"]


@needs_sandbox()
def test_models_saved_by_mlflow_315_to_318_clients_import_and_pass_the_sandbox(
        tracking_server: dict[str, str], personas: dict[str, Any], api_as: Any, churn: Any, tmp_path: Path) -> None:
    """Each client's files logged as a run's model folder on the tracking server (as those clients' log_model
    leaves them), imported by URI, scanned in the sandbox and ready."""
    from mlflow import MlflowClient

    from tests.registry.versions.test_mlflow_clients import CLIENTS, client_fixture

    mlflow_client = MlflowClient(tracking_uri=tracking_server["uri"], registry_uri=tracking_server["uri"])
    experiment = mlflow_client.create_experiment("client-fixtures")
    api = api_as(personas["ds"])
    for client in CLIENTS:
        folder = tmp_path / client
        with zipfile.ZipFile(client_fixture(client, "logreg")) as archive:
            archive.extractall(folder)
        run = mlflow_client.create_run(experiment, run_name=f"saved-by-{client}")
        mlflow_client.log_artifacts(run.info.run_id, str(folder), artifact_path="model")
        mlflow_client.set_terminated(run.info.run_id)
        with override_settings(PORTAL_MLFLOW_TRACKING_URI=tracking_server["uri"]):
            response = api.post(IMPORT, {"uri": f"runs:/{run.info.run_id}/model"}, format="json")
        assert response.status_code == 201, (client, response.content)
        version = services.version_scan(version_id=ModelVersion.objects.get(model=churn,
                                                                            number=response.json()["number"]).pk)
        assert version.status == "ready", (client, version.status_detail)
        assert version.mlflow_source.run_name == f"saved-by-{client}"
