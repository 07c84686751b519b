"""Demo data for ``seed_demo``: a model trained on scikit-learn's bundled breast-cancer data, with reference data
and two versions (a logistic regression as skops, a random forest as an MLflow model directory)."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError

from portal.models import Team
from registry.deployments import services as deployments
from registry.models import RegisteredModel, TeamTrustedType, VersionStatus
from registry.promotions import services as promotions
from registry.versions import services
from registry.versions.localfiles import LocalUpload

DEMO_MODEL = "breast-cancer"
TREE_TYPE = "sklearn.tree._tree.Tree"


def _dataset() -> Any:
    from sklearn.datasets import load_breast_cancer

    return load_breast_cancer(return_X_y=True, as_frame=True)


def build_logistic_regression(workdir: Path) -> tuple[Path, dict[str, float]]:
    import skops.io
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _dataset()
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=7)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X_train, y_train)
    path = workdir / "breast-cancer-logreg.skops"
    skops.io.dump(model, path)
    return path, {"accuracy": float(model.score(X_test, y_test))}


def build_random_forest_mlflow(workdir: Path, *, n_estimators: int = 50) -> tuple[Path, dict[str, float]]:
    import mlflow.sklearn
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    X, y = _dataset()
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=7)
    model = RandomForestClassifier(n_estimators=n_estimators, random_state=7).fit(X_train, y_train)
    target = workdir / "rf-model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.sklearn.save_model(model, str(target), input_example=X_train.head(3),
                                  skops_trusted_types=[TREE_TYPE])
    archive = shutil.make_archive(str(workdir / "breast-cancer-rf"), "zip", root_dir=target)
    return Path(archive), {"accuracy": float(model.score(X_test, y_test))}


def build_reference_csv(workdir: Path) -> Path:
    X, y = _dataset()
    frame = X.copy()
    frame["target"] = y
    path = workdir / "reference.csv"
    frame.to_csv(path, index=False)
    return path


def seed(*, team: Team, users: dict[str, Any], stdout: Any) -> None:
    if RegisteredModel.objects.filter(name=DEMO_MODEL, versions__isnull=False).exists():
        return
    ds, approver = users["ds"], users["approver1"]
    model = RegisteredModel.objects.filter(name=DEMO_MODEL).first() or services.model_register(
        name=DEMO_MODEL, team=team, description="Classifies breast tumours as malignant or benign "
        "(scikit-learn's bundled Wisconsin data set). Demo model.", tags=["demo", "classification"], actor=ds)
    if not TeamTrustedType.objects.filter(team=team, type_name=TREE_TYPE).exists():
        services.team_trust_type(team=team, type_name=TREE_TYPE, actor=approver,
                                 reason="Tree node storage of scikit-learn forests; demo models are trained in-house.")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reference = build_reference_csv(work)
        for builder, description in ((build_logistic_regression, "Logistic regression on standardised features."),
                                     (build_random_forest_mlflow, "Random forest, saved by MLflow.")):
            path, metrics = builder(work)
            meta = services.UploadMetadata(
                description=description, metrics=metrics, source="registry/demo.py", intended_use=(
                    "Demonstrating the portal. Not for clinical use."),
                limitations="Trained on 426 rows of one public data set.",
                ethical_considerations="Medical data: a wrong prediction can harm a patient; a person decides.")
            upload, ref = LocalUpload(path, path.name), LocalUpload(reference, reference.name)
            try:
                version = services.version_upload(model=model, upload=upload, reference=ref, meta=meta, actor=ds)
            finally:
                upload.close()
                ref.close()
            version = services.version_scan(version_id=version.pk)
            state = "ready" if version.status == VersionStatus.READY else f"{version.status}: {version.status_detail}"
            stdout.write(f"Demo model {model.name} v{version.number}: {state}")
    first = model.versions.filter(number=1, status=VersionStatus.READY).first()
    if first is not None:
        deployment = deployments.deployment_start(version=first, environment="dev", actor=ds,
                                                  reason="Demo: the first version serves dev.")
        deployment = deployments.deployment_run(deployment_id=deployment.pk) or deployment
        stdout.write(f"Demo model {model.name} v1 in dev: {deployment.status} {deployment.error}".rstrip())
    second = model.versions.filter(number=2, status=VersionStatus.READY).first()
    if second is not None:
        try:
            promotion = promotions.promotion_request(
                version=second, target="stage", actor=ds,
                reason="Demo: the random forest scores higher on held-out data; please review for stage.")
            stdout.write(f"Demo model {model.name} v2: promotion to stage requested ({promotion.status}); "
                         "sign in as approver1 to review it.")
        except ValidationError as exc:
            stdout.write(f"Demo model {model.name} v2: no promotion requested ({' '.join(exc.messages)})")
