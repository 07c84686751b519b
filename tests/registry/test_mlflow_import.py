"""Import from a real (local, sqlite-backed) MLflow tracking store, keeping the run's lineage."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from django.test import Client, override_settings

from portal.models import Team
from registry import services
from tests.conftest import assert_error_shape
from tests.registry import files

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import mlflow
    import mlflow.sklearn

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.create_experiment("churn", artifact_location=str(root / "artifacts"))
        with warnings.catch_warnings(), mlflow.start_run(experiment_id=experiment) as run:
            warnings.simplefilter("ignore")
            mlflow.log_params({"C": "1.0", "max_iter": "500"})
            mlflow.log_metrics({"accuracy": 0.97, "auc": 0.99})
            mlflow.set_tag("mlflow.source.git.commit", "0badc0ffee12")
            from tests.registry.files import _data

            X, _y = _data()
            mlflow.sklearn.log_model(files.logistic_regression(), name="model", input_example=X.head(2),
                                     registered_model_name="churn-lr")
    finally:
        mlflow.set_tracking_uri(previous)
    return {"uri": uri, "run_id": run.info.run_id}


@pytest.fixture
def churn(personas: dict[str, Any]) -> Any:
    return services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])


def test_import_a_registered_model_version_with_lineage(tracking_store: dict[str, str], personas: dict[str, Any],
                                                        api_as: Any, churn: Any) -> None:
    with override_settings(PORTAL_MLFLOW_TRACKING_URI=tracking_store["uri"]):
        response = api_as(personas["ds"]).post("/api/v1/models/churn/versions/import", {"uri": "models:/churn-lr/1"},
                                               format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["format"] == "mlflow" and body["lineage"]["mlflow_run_id"] == tracking_store["run_id"]
    assert body["lineage"]["git_commit"] == "0badc0ffee12" and body["lineage"]["source"] == "models:/churn-lr/1"
    assert body["metrics"] == {"accuracy": 0.97, "auc": 0.99} and body["params"] == {"C": "1.0", "max_iter": "500"}
    assert len(body["signature"]["inputs"]) == 30


def test_import_by_run_uri(tracking_store: dict[str, str], personas: dict[str, Any], api_as: Any, churn: Any) -> None:
    with override_settings(PORTAL_MLFLOW_TRACKING_URI=tracking_store["uri"]):
        response = api_as(personas["ds"]).post("/api/v1/models/churn/versions/import",
                                               {"uri": f"runs:/{tracking_store['run_id']}/model"}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["lineage"]["mlflow_run_id"] == tracking_store["run_id"]


@pytest.mark.parametrize("uri,words", [("models:/churn-lr/9", "could not provide"), ("s3://bucket/x", "Use models:/"),
                                       ("runs:/abc/../../etc", "Use models:/"), ("models:/churn-lr/1/../x", "Use")])
def test_bad_uris_are_explained(tracking_store: dict[str, str], personas: dict[str, Any], api_as: Any, churn: Any,
                                uri: str, words: str) -> None:
    with override_settings(PORTAL_MLFLOW_TRACKING_URI=tracking_store["uri"]):
        body = assert_error_shape(api_as(personas["ds"]).post("/api/v1/models/churn/versions/import", {"uri": uri},
                                                              format="json"), 400)
    assert words in body["error"]["message"]


def test_import_is_refused_when_not_configured(personas: dict[str, Any], api_as: Any, churn: Any) -> None:
    body = assert_error_shape(api_as(personas["ds"]).post("/api/v1/models/churn/versions/import",
                                                          {"uri": "models:/x/1"}, format="json"), 400)
    assert "PORTAL_MLFLOW_TRACKING_URI" in body["error"]["message"]


def test_import_from_the_upload_page(tracking_store: dict[str, str], client: Client, personas: dict[str, Any],
                                     churn: Any) -> None:
    client.force_login(personas["ds"])
    with override_settings(PORTAL_MLFLOW_TRACKING_URI=tracking_store["uri"]):
        assert b"Or import from MLflow" in client.get("/models/churn/upload").content
        response = client.post("/models/churn/import", {"uri": "models:/churn-lr/1"})
    assert response.status_code == 302 and response.headers["Location"] == "/models/churn/versions/1/"
    assert client.post("/models/churn/import", {"uri": "nonsense"}).status_code == 302
