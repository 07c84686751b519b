"""Edge packages' fixtures: two small models on standardised synthetic data (a scikit-learn logistic regression and an
XGBoost classifier) with reference data, and a bare interpreter holding only onnxruntime and numpy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from portal.models import Team
from registry.models import ModelVersion
from registry.versions import services
from registry.versions.localfiles import LocalUpload
from tests.registry import files

COLUMNS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


def edge_data(n: int = 400) -> tuple[Any, Any]:
    import pandas as pd
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=n, n_features=len(COLUMNS), n_informative=4, random_state=7)
    return pd.DataFrame(X, columns=COLUMNS), pd.Series(y, name="target")


def register_version(name: str, estimator: Any, personas: dict[str, Any], tmp_path: Path,
                     reference_rows: int = 300) -> ModelVersion:
    team = Team.objects.get(slug="acme")
    model = services.model_register(name=name, team=team, actor=personas["ds"])
    X, y = edge_data()
    artifact = files.joblib_file(tmp_path / f"{name}.joblib", estimator)
    reference = X.head(reference_rows).copy()
    reference["target"] = y.head(reference_rows)
    reference.to_csv(tmp_path / f"{name}-ref.csv", index=False)
    version = services.version_upload(model=model, upload=LocalUpload(artifact, artifact.name),
                                      reference=LocalUpload(tmp_path / f"{name}-ref.csv", "ref.csv"),
                                      meta=services.UploadMetadata(), actor=personas["ds"])
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", version.status_detail
    return version


@pytest.fixture
def edge_lr(personas: dict[str, Any], tmp_path: Path) -> ModelVersion:
    from sklearn.linear_model import LogisticRegression

    X, y = edge_data()
    return register_version("edge-lr", LogisticRegression(max_iter=500).fit(X, y), personas, tmp_path)


@pytest.fixture
def edge_xgb(personas: dict[str, Any], tmp_path: Path) -> ModelVersion:
    from xgboost import XGBClassifier

    X, y = edge_data()
    return register_version("edge-xgb", XGBClassifier(n_estimators=12, max_depth=3, n_jobs=1).fit(X, y), personas,
                            tmp_path)


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv whose site-packages hold only onnxruntime and numpy and what they import when imported
    (found by importing: each missing module is linked in from this environment and named), offline and in a
    second; no portal, Django, scikit-learn, XGBoost or cryptography."""
    import numpy
    import onnxruntime

    root = tmp_path_factory.mktemp("edge-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site = next((root / "lib").glob("python3*/site-packages"))
    here = Path(numpy.__file__).resolve().parent.parent
    for package in (Path(numpy.__file__).resolve().parent, Path(onnxruntime.__file__).resolve().parent,
                    *here.glob("numpy.libs"), *here.glob("onnxruntime.libs")):
        (site / package.name).symlink_to(package)
    python = root / "bin" / "python"
    linked = []
    for _ in range(10):
        probe = subprocess.run([str(python), "-c", "import numpy, onnxruntime"], capture_output=True, text=True,
                               timeout=120, env=bare_env(), cwd=root)
        if probe.returncode == 0:
            break
        missing = re.search(r"No module named '([^'.]+)", probe.stderr)
        assert missing, probe.stderr[-2000:]
        source = next(iter(here.glob(missing.group(1)))) if list(here.glob(missing.group(1))) else \
            here / f"{missing.group(1)}.py"
        assert source.exists(), f"onnxruntime needs {missing.group(1)}, not found in {here}"
        (site / source.name).symlink_to(source)
        linked.append(source.name)
    else:
        pytest.fail("onnxruntime does not import in the bare environment")
    for absent in ("sklearn", "xgboost", "django", "cryptography", "registry"):
        probe = subprocess.run([str(python), "-c", f"import {absent}"], capture_output=True, timeout=60,
                               env=bare_env(), cwd=root)
        assert probe.returncode != 0, f"{absent} is importable in the bare environment"
    (root / "linked.txt").write_text("\n".join(linked))
    return python


def bare_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
