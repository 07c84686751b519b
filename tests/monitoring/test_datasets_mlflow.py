"""Lineage from MLflow: a run tagged ``portal.trained_on`` imports as a version trained on those snapshots; a tag
naming another team's snapshot is refused, naming it, with nothing imported."""

from __future__ import annotations

import datetime as dt
import warnings
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from monitoring.models import DatasetSnapshot, TrainingLink
from portal.models import Team
from registry.models import ModelVersion
from registry.versions import services
from tests.conftest import assert_error_shape
from tests.registry import files
from tests.registry.versions.test_mlflow_import import IMPORT, churn, tracking_server  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db


def _run_tagged(uri: str, trained_on: str) -> str:
    import mlflow
    import mlflow.sklearn

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with warnings.catch_warnings(), mlflow.start_run(run_name="retrained") as run:
            warnings.simplefilter("ignore")
            mlflow.set_tag("portal.trained_on", trained_on)
            mlflow.sklearn.log_model(files.logistic_regression(), name="model", pip_requirements=["scikit-learn"])
    finally:
        mlflow.set_tracking_uri(previous)
    return str(run.info.run_id)


def test_a_run_tag_names_the_training_snapshots(tracking_server: dict[str, str], personas: dict[str, Any],  # noqa: F811
                                                 api_as: Any, churn: Any) -> None:  # noqa: F811
    now = timezone.now()
    window = {"environment": "dev", "window_start": now - dt.timedelta(days=1), "window_end": now,
              "status": "ready"}
    ours = DatasetSnapshot.objects.create(model=churn, sha256="a" * 64, **window)
    rival = services.model_register(name="rival", team=Team.objects.get(slug="other"), actor=personas["outsider"])
    theirs = DatasetSnapshot.objects.create(model=rival, sha256="b" * 64, **window)
    api = api_as(personas["ds"])
    with override_settings(PORTAL_MLFLOW_TRACKING_URI=tracking_server["uri"]):
        refused = api.post(IMPORT, {"uri": f"runs:/{_run_tagged(tracking_server['uri'], str(theirs.uid))}/model"},
                           format="json")
        assert str(theirs.uid) in assert_error_shape(refused, 400)["error"]["message"]
        assert not ModelVersion.objects.filter(model=churn).exists()
        imported = api.post(IMPORT, {"uri": f"runs:/{_run_tagged(tracking_server['uri'], str(ours.uid))}/model"},
                            format="json")
    assert imported.status_code == 201, imported.content
    link = TrainingLink.objects.get()
    assert link.snapshot == ours and link.version.number == imported.json()["number"]
    assert link.snapshot_sha256 == "a" * 64
