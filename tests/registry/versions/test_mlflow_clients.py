"""Models saved by the MLflow clients data scientists have on their laptops (3.15, 3.16, 3.17 and 3.18, each run in
its own throwaway virtualenv by ``fixtures/mlflow_clients/make_fixture.py``; every one of them writes scikit-learn
models with skops) upload, pass the sandbox and serve the model's own answers. A tree model's skops types that the
client declared trusted in its MLmodel are not trusted by the portal: the version waits for an approver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from portal import services as portal_services
from portal.models import Team
from registry.versions import services
from registry.versions.localfiles import LocalUpload
from tests.conftest import EntryPointClient, needs_sandbox
from tests.registry.conftest import deploy_now

pytestmark = [pytest.mark.django_db, needs_sandbox()]
FIXTURES = Path(__file__).parent / "fixtures" / "mlflow_clients"
CLIENTS = ["3.15", "3.16", "3.17", "3.18"]
TREE_TYPE = "sklearn.tree._tree.Tree"


def client_fixture(client: str, kind: str) -> Path:
    return FIXTURES / f"mlflow-{client}-{kind}.zip"


def training_data() -> tuple[pd.DataFrame, np.ndarray]:
    """The data ``make_fixture.py`` trained on (same generator and seed)."""
    rng = np.random.default_rng(34)
    X = pd.DataFrame(rng.normal(size=(120, 4)), columns=["tenure", "spend", "calls", "age"])
    y = ((X["tenure"] - X["calls"] + 0.3 * rng.normal(size=120)) > 0).astype(int).to_numpy()
    return X, y


def test_every_fixture_was_saved_by_its_client_with_skops() -> None:
    import zipfile

    for client in CLIENTS:
        for kind in ("logreg", "tree"):
            with zipfile.ZipFile(client_fixture(client, kind)) as archive:
                mlmodel = yaml.safe_load(archive.read("MLmodel"))
                assert "model.skops" in archive.namelist()
            assert mlmodel["mlflow_version"].startswith(client + "."), mlmodel["mlflow_version"]
            assert mlmodel["flavors"]["sklearn"]["serialization_format"] == "skops"
            assert client_fixture(client, kind).stat().st_size < 20_000


def _serve(version: Any, actor: Any) -> EntryPointClient:
    deploy_now(version, actor)
    _token, plaintext = portal_services.token_create(user=actor, name="serve", actor=actor)
    return EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")


@pytest.mark.parametrize("client", CLIENTS)
def test_a_model_saved_by_each_mlflow_client_uploads_and_serves_its_own_answers(
        client: str, personas: dict[str, Any]) -> None:
    from sklearn.linear_model import LogisticRegression

    archive = client_fixture(client, "logreg")
    model = services.model_register(name="plans", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    version = services.version_upload(model=model, upload=LocalUpload(archive, archive.name), reference=None,
                                      meta=services.UploadMetadata(), actor=personas["ds"])
    assert version.format == "mlflow" and version.trust_state != "pending", version.untrusted_types
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", version.status_detail
    assert [c["name"] for c in version.signature["inputs"]] == ["tenure", "spend", "calls", "age"]
    X, y = training_data()
    expected = LogisticRegression(max_iter=500).fit(X, y).predict(X.head(8)).tolist()
    served = _serve(version, personas["ds"]).post(
        "/api/v1/serve/plans/dev/invocations",
        json.dumps({"dataframe_split": {"columns": list(X.columns), "data": X.head(8).values.tolist()}}),
        content_type="application/json")
    assert served.status_code == 200, served.content
    assert served.json()["predictions"] == expected


def test_a_tree_saved_by_mlflow_318_waits_for_an_approver_whatever_its_mlmodel_trusts(
        personas: dict[str, Any]) -> None:
    """MLflow 3.18 makes ``log_model`` name the tree's skops types in ``skops_trusted_types``; the uploader's word is
    not the portal's decision: the version waits until an approver who did not upload it trusts the type."""
    from sklearn.tree import DecisionTreeClassifier

    archive = client_fixture("3.18", "tree")
    model = services.model_register(name="plans", team=Team.objects.get(slug="acme"), actor=personas["ds"])
    version = services.version_upload(model=model, upload=LocalUpload(archive, archive.name), reference=None,
                                      meta=services.UploadMetadata(), actor=personas["ds"])
    assert version.trust_state == "pending" and TREE_TYPE in version.untrusted_types
    version = services.version_scan(version_id=version.pk)
    assert version.status != "ready"  # nothing loads it before the decision
    version = services.version_trust_decide(version=version, trust=True, reason="A plain decision tree; reviewed",
                                            actor=personas["approver1"])
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", version.status_detail
    X, y = training_data()
    expected = DecisionTreeClassifier(max_depth=3, random_state=0).fit(X, y).predict(X.head(8)).tolist()
    served = _serve(version, personas["ds"]).post(
        "/api/v1/serve/plans/dev/invocations",
        json.dumps({"dataframe_split": {"columns": list(X.columns), "data": X.head(8).values.tolist()}}),
        content_type="application/json")
    assert served.status_code == 200 and served.json()["predictions"] == expected, served.content
