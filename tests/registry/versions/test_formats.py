"""Every accepted format passes the static checks and reaches `ready` after the sandboxed load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.models import Team
from registry.models import ModelVersion
from registry.versions import services
from tests.registry import files

pytestmark = pytest.mark.django_db


def _xgboost(path: Path) -> Path:
    from xgboost import XGBClassifier

    X, y = files._data()
    return files.joblib_file(path, XGBClassifier(n_estimators=5).fit(X, y))


def _lightgbm(path: Path) -> Path:
    from lightgbm import LGBMClassifier

    X, y = files._data()
    return files.pickle_file(path, LGBMClassifier(n_estimators=5, verbose=-1).fit(X, y), protocol=4)


GOOD: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "skops": ("m.skops", files.skops_file, "skops"),
    "pickle protocol 2": ("m.pkl", lambda p: files.pickle_file(p, protocol=2), "pickle"),
    "pickle protocol 5": ("m.pkl", files.pickle_file, "pickle"),
    "joblib": ("m.joblib", files.joblib_file, "joblib"),
    "compressed joblib": ("m.joblib", lambda p: files.joblib_file(p, compress=3), "joblib"),
    "onnx": ("m.onnx", files.onnx_file, "onnx"),
    "xgboost": ("m.joblib", _xgboost, "joblib"),
    "lightgbm": ("m.pkl", _lightgbm, "pickle"),
    "mlflow": ("m.zip", lambda p: files.mlflow_zip(p.parent), "mlflow"),
}


@pytest.mark.parametrize("case", list(GOOD), ids=list(GOOD))
def test_accepted_formats_reach_ready(case: str, personas: dict[str, Any], api_as: Any, tmp_path: Path) -> None:
    name, builder, fmt = GOOD[case]
    team = Team.objects.get(slug="acme")
    services.model_register(name="m", team=team, actor=personas["ds"])
    services.team_trust_type(team=team, type_name="sklearn.tree._tree.Tree", actor=personas["approver1"],
                             reason="Forests from our own pipeline.")
    path = builder(tmp_path / name)
    ref = SimpleUploadedFile("ref.csv", files.reference_csv(tmp_path / "ref.csv").read_bytes())
    response = api_as(personas["ds"]).post("/api/v1/models/m/versions/", {
        "file": SimpleUploadedFile(name, path.read_bytes()), "reference_data": ref}, format="multipart")
    assert response.status_code == 201, response.content
    assert response.json()["format"] == fmt
    version = services.version_scan(version_id=ModelVersion.objects.get().pk)
    assert version.status == "ready", (version.status_detail, version.sandbox_report)
    assert version.signature["inputs"] and version.sandbox_report["predictions"]
