"""Shared by the registry's tests: two ready versions of model `churn`, deploying at once, example rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from portal import services as portal_services
from portal.models import Team
from registry.deployments import services as deployments
from registry.models import Deployment, ModelVersion
from registry.serving import runtime
from registry.versions import services
from tests.conftest import EntryPointClient
from tests.registry import files


@pytest.fixture(autouse=True)
def fresh_serving_cache() -> None:
    runtime.cache.clear()
    from monitoring import sensitive

    sensitive.sensitive_positions.cache_clear()  # keyed by model name and version, which tests reuse
    from registry.serving import views

    views._auth_cache.clear()
    views._model_cache.clear()
    from registry.serving import endpoints

    endpoints.cache.clear()
    endpoints._access_cache.clear()
    from registry.serving import buffer

    client = buffer.redis_client()
    if client is not None:
        streams = buffer.stream_keys()
        client.delete(*streams, *(f"{k}:flushed" for k in streams))


@pytest.fixture
def two_versions(personas: dict[str, Any], tmp_path: Path) -> list[ModelVersion]:
    from sklearn.linear_model import LogisticRegression

    team = Team.objects.get(slug="acme")
    model = services.model_register(name="churn", team=team, actor=personas["ds"])
    X, y = files._data()
    versions = []
    for i, estimator in enumerate((files.logistic_regression(), LogisticRegression(C=0.001, max_iter=50).fit(X, y))):
        path = files.joblib_file(tmp_path / f"v{i}.joblib", estimator)
        from registry.versions.localfiles import LocalUpload

        upload = LocalUpload(path, path.name)
        ref = LocalUpload(files.reference_csv(tmp_path / "ref.csv"), "ref.csv")
        version = services.version_upload(model=model, upload=upload, reference=ref,
                                          meta=services.UploadMetadata(), actor=personas["ds"])
        versions.append(services.version_scan(version_id=version.pk))
    assert [v.status for v in versions] == ["ready", "ready"], [v.status_detail for v in versions]
    return versions


def deploy_now(version: ModelVersion, actor: Any, **kwargs: Any) -> Deployment:
    deployment = deployments.deployment_start(version=version, environment="dev", actor=actor, **kwargs)
    result = deployments.deployment_run(deployment_id=deployment.pk)
    assert result is not None and result.status == "live", (result.error if result else None)
    return result


@pytest.fixture
def serving(two_versions: list[ModelVersion], personas: dict[str, Any]) -> Client:
    deploy_now(two_versions[0], personas["ds"])
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="serve", actor=personas["ds"])
    return EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")


def rows(n: int = 3) -> tuple[list[str], list[list[float]]]:
    X, _y = files._data()
    return list(X.columns), X.head(n).to_numpy().tolist()


@pytest.fixture
def ds_client(serving: Client, personas: dict[str, Any], settings: Any) -> Client:
    """A data scientist's browser session, with uploads cut into 1 MB chunks on the way in (batch jobs of several
    chunks from small files)."""
    settings.PORTAL_BATCH_CHUNK_BYTES = 1024 * 1024
    client = Client()
    client.force_login(personas["ds"])
    return client
