"""Three models of team ``acme`` deployed in dev, each answering a constant (alpha 1, beta 2, gamma 3: linear
regressions fitted to a constant target, served by the in-process ONNX path), so every answer says which model gave
it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from portal.models import Team
from registry.models import ModelVersion
from registry.versions import services as versions
from registry.versions.localfiles import LocalUpload
from tests.registry import files
from tests.registry.conftest import deploy_now

CONSTANT = {"alpha": 1.0, "beta": 2.0, "gamma": 3.0}


def constant_model(tmp_path: Path, name: str, value: float, actor: Any, team: str = "acme") -> ModelVersion:
    from sklearn.linear_model import LinearRegression

    X, _y = files._data()
    model = versions.model_register(name=name, team=Team.objects.get(slug=team), actor=actor)
    path = files.joblib_file(tmp_path / f"{name}.joblib", LinearRegression().fit(X, np.full(len(X), value)))
    version = versions.version_upload(model=model, upload=LocalUpload(path, path.name),
                                      reference=LocalUpload(files.reference_csv(tmp_path / f"{name}.csv"),
                                                            "ref.csv"),
                                      meta=versions.UploadMetadata(), actor=actor)
    return versions.version_scan(version_id=version.pk)


@pytest.fixture
def three_models(personas: dict[str, Any], tmp_path: Path) -> dict[str, ModelVersion]:
    """alpha, beta and gamma deployed in dev (three real sandboxed scans and ONNX preparations: the one slow part,
    shared by every test here through the sandbox cache)."""
    made = {name: constant_model(tmp_path, name, value, personas["ds"]) for name, value in CONSTANT.items()}
    for version in made.values():
        deploy_now(version, personas["ds"])
    return made


