"""The in-process ONNX fast path is used only once the portal has proven it predicts exactly what the model
predicts (issue 32): on the whole reference data, and on probes at and just around every split threshold (trees)
or around neighbour ties (KNN). A conversion that would answer otherwise is never chosen, and the deployment log says
which form serves and why, with the numbers checked.

The first two tests are the issue's own cases: an iris RandomForest(n_estimators=50) that the float32 conversion
sent to class 2 where MLflow answers 1, and a KNN that the conversion answered 1 where MLflow answers 2.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from portal import services as portal_services
from portal.models import Team
from registry.deployments.services import compare_predictions
from registry.sandbox import child
from registry.versions import services
from registry.versions.localfiles import LocalUpload
from tests.conftest import EntryPointClient, needs_sandbox
from tests.registry.conftest import deploy_now

IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ISSUE_ROW = {"sepal_length": 6.042, "sepal_width": 2.194, "petal_length": 4.95, "petal_width": 1.461}


def _iris() -> tuple[Any, Any]:
    from sklearn.datasets import load_iris

    data = load_iris(as_frame=True)
    X = data.data.copy()
    X.columns = IRIS_COLUMNS
    return X, data.target


def _iris_forest() -> Any:
    from sklearn.ensemble import RandomForestClassifier

    X, y = _iris()
    return RandomForestClassifier(n_estimators=50, random_state=0).fit(X, y)


def _random_rows(X: Any, n: int, seed: int = 0) -> Any:
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.uniform(X.min().to_numpy(), X.max().to_numpy(), size=(n, X.shape[1])).round(3),
                        columns=X.columns)


def _zip(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.rglob("*"):
            zf.write(path, Path("model") / path.relative_to(folder))
    return archive


def _deploy_mlflow(personas: dict[str, Any], tmp_path: Path, name: str, model: Any, X: Any,
                   trusted: tuple[str, ...] = ("sklearn.tree._tree.Tree",),
                   reference: Path | None = None) -> tuple[Any, Any]:
    """Saved the docs' way (signature inferred from input and output, an input example), uploaded (with its
    reference data, if given), trusted where MLflow's skops file names the tree type, scanned, deployed;
    (deployment, a scoring client)."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    folder = tmp_path / name
    mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(X, model.predict(X)),
                              input_example=X.head(5), skops_trusted_types=list(trusted))
    archive = _zip(folder, tmp_path / f"{name}.zip")
    registered = services.model_register(name=name, team=Team.objects.get(slug="acme"), actor=personas["ds"])
    version = services.version_upload(model=registered, upload=LocalUpload(archive, archive.name),
                                      reference=LocalUpload(reference, reference.name) if reference else None,
                                      meta=services.UploadMetadata(), actor=personas["ds"])
    if version.trust_state == "pending":
        version = services.version_trust_decide(version=version, trust=True, reason="scikit-learn's own tree type",
                                                actor=personas["approver1"])
    version = services.version_scan(version_id=version.pk)
    assert version.status == "ready", version.status_detail
    deployment = deploy_now(version, personas["ds"])
    _token, plaintext = portal_services.token_create(user=personas["ds"], name="serve", actor=personas["ds"])
    return deployment, EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}")


def _log(deployment: Any) -> str:
    return "\n".join(entry["message"] for entry in deployment.log)


@pytest.mark.django_db
@needs_sandbox()
def test_the_issues_iris_forest_answers_what_mlflow_answers_on_the_fast_path(personas: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    X, _y = _iris()
    forest = _iris_forest()
    deployment, client = _deploy_mlflow(personas, tmp_path, "iris-forest", forest, X)
    url = "/api/v1/serve/iris-forest/dev/invocations"
    response = client.post(url, json.dumps({"dataframe_records": [ISSUE_ROW]}), content_type="application/json")
    assert response.status_code == 200, response.content
    assert response.json()["predictions"] == [1] == forest.predict(_frame([ISSUE_ROW])).tolist()
    rows = _random_rows(X, 10_000)
    body = {"dataframe_split": {"columns": IRIS_COLUMNS, "data": rows.to_numpy().tolist()}}
    response = client.post(url, json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    assert response.json()["predictions"] == forest.predict(rows).tolist()
    log = _log(deployment)
    assert deployment.serving_kind == "onnx", log
    assert "double-precision tree ensemble" in log and "0 mismatches" in log and "split-threshold probes" in log, log


def _frame(records: list[dict[str, float]]) -> Any:
    import pandas as pd

    return pd.DataFrame(records, columns=IRIS_COLUMNS)


@pytest.mark.django_db
@needs_sandbox()
def test_a_knn_whose_conversion_breaks_ties_otherwise_is_served_by_the_model_itself(personas: dict[str, Any],
                                                                                    tmp_path: Path) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    X, y = _iris()
    X2 = X[IRIS_COLUMNS[:2]]
    knn = KNeighborsClassifier().fit(X2, y)
    deployment, client = _deploy_mlflow(personas, tmp_path, "iris-knn", knn, X2, trusted=(
        "sklearn.metrics._dist_metrics.EuclideanDistance64", "sklearn.neighbors._kd_tree.KDTree"))
    url = "/api/v1/serve/iris-knn/dev/invocations"
    response = client.post(url, json.dumps({"inputs": {"sepal_length": [5.9], "sepal_width": [3.0]}}),
                           content_type="application/json")
    assert response.status_code == 200, response.content
    assert response.json()["predictions"] == [2] == knn.predict(X2.iloc[:0].reindex([0]).fillna(
        {"sepal_length": 5.9, "sepal_width": 3.0})).tolist()
    body = {"dataframe_split": {"columns": IRIS_COLUMNS[:2], "data": X2.to_numpy().tolist()}}
    response = client.post(url, json.dumps(body), content_type="application/json")
    assert response.json()["predictions"] == knn.predict(X2).tolist()
    log = _log(deployment)
    assert deployment.serving_kind == "mlflow", log
    # Its ONNX form never serves: either the portal's review sends it to a host (the converter's KNN graph uses a
    # Scan, control flow the web workers do not run), or the tie probes disprove it.
    assert ("its ONNX form uses control flow (Scan)" in log
            or ("was not proven" in log and "neighbour-tie probes" in log and "first mismatch" in log)), log


def test_threshold_probes_catch_the_float32_conversion_and_pass_the_double_one() -> None:
    """The probes find what the issue found (the float32 trees decide otherwise near a split), and the
    double-precision ensemble the portal now builds agrees with scikit-learn on every one of them."""
    import onnxruntime
    from skl2onnx import to_onnx

    X, _y = _iris()
    forest = _iris_forest()
    probes, info = child.tree_probes(forest, X.to_numpy(), 100_000, np.random.default_rng(0))
    assert info["split_nodes_probed"] == info["split_nodes"] > 100
    finite = probes[np.isfinite(probes).all(axis=1)]
    native = forest.predict(_frame(finite.tolist()))

    def run(onnx_model: Any, rows: Any) -> Any:
        session = onnxruntime.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
        first = session.get_inputs()[0]
        dtype = np.float32 if first.type == "tensor(float)" else np.float64
        return session.run(None, {first.name: rows.astype(dtype)})[0].ravel()

    old = to_onnx(forest, X.to_numpy()[:1].astype("float64"), options={id(forest): {"zipmap": False}},
                  target_opset=17)
    mismatched, _deviation = compare_predictions(native, run(old, finite))
    assert mismatched.sum() > 0, "the probes must catch the float32 thresholds' different decisions"
    double = child.tree_ensemble_onnx(forest)
    mismatched, _deviation = compare_predictions(native, run(double, finite))
    assert mismatched.sum() == 0
    with_missing = forest.predict(_frame(probes.tolist()))
    assert compare_predictions(with_missing, run(double, probes))[0].sum() == 0


def test_tree_ensembles_agree_with_scikit_learn_on_regression_strings_and_missing_values() -> None:
    import onnxruntime
    import pandas as pd
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestRegressor
    from sklearn.tree import DecisionTreeClassifier

    X, y = _iris()
    with_missing = X.copy()
    with_missing.iloc[::6, 1] = np.nan
    labels = np.array(["setosa", "versicolor", "virginica"])[y]
    cases = [(RandomForestRegressor(n_estimators=20, random_state=0).fit(X[IRIS_COLUMNS[:3]], X.petal_width),
              IRIS_COLUMNS[:3]),
             (ExtraTreesClassifier(n_estimators=20, random_state=0).fit(with_missing, labels), IRIS_COLUMNS),
             (DecisionTreeClassifier(random_state=0).fit(X, y), IRIS_COLUMNS)]
    for model, columns in cases:
        rows = _random_rows(X[columns], 5_000, seed=1)
        rows.iloc[::9, 1] = np.nan
        probes, _info = child.tree_probes(model, rows.dropna().to_numpy(), 50_000, np.random.default_rng(1))
        matrix = np.concatenate([rows.to_numpy(), probes])
        session = onnxruntime.InferenceSession(child.tree_ensemble_onnx(model).SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        ours = session.run(None, {"X": matrix})[0].ravel()
        native = model.predict(pd.DataFrame(matrix, columns=columns))
        mismatched, deviation = compare_predictions(native, ours)
        assert mismatched.sum() == 0 and deviation <= 1e-9, (type(model).__name__, deviation)


def test_comparison_is_exact_for_labels_and_relative_for_numbers() -> None:
    mismatched, deviation = compare_predictions(np.array([1.0, np.nan, 2.0]), np.array([1.0 + 1e-12, np.nan, 2.1]))
    assert mismatched.tolist() == [False, False, True] and deviation == pytest.approx(0.1 / 2.1)
    assert compare_predictions(np.array(["a", "b"]), np.array(["a", "c"], dtype=object))[0].tolist() == [False, True]
    assert compare_predictions(np.array([1, 2]), np.array([1, 3]))[0].tolist() == [False, True]
    assert compare_predictions(np.array([1.0]), np.array([np.nan]))[0].tolist() == [True]


@pytest.mark.django_db
@needs_sandbox()
def test_a_forest_trained_with_missing_values_uploads_with_a_nan_example_deploys_and_serves_them(
        personas: dict[str, Any], tmp_path: Path) -> None:
    """MLflow writes NaN into input_example.json; it is stored as null (PostgreSQL's JSON refuses NaN) and the
    forest, proven on missing values, takes nulls as MLflow passes them: NaN."""
    from sklearn.ensemble import RandomForestClassifier

    X, y = _iris()
    X = X.copy()
    X.iloc[::4, 1] = np.nan
    forest = RandomForestClassifier(n_estimators=20, random_state=0).fit(X, y)
    assert X.head(5).isna().any().any()
    deployment, client = _deploy_mlflow(personas, tmp_path, "iris-missing", forest, X)
    assert deployment.version.input_example["data"][0][1] is None
    assert deployment.serving_kind == "onnx" and "missing values included" in _log(deployment), _log(deployment)
    rows = _random_rows(X, 2_000, seed=3)
    rows.iloc[::3, 1] = np.nan
    data = [[None if v != v else v for v in row] for row in rows.to_numpy().tolist()]
    response = client.post("/api/v1/serve/iris-missing/dev/invocations",
                           json.dumps({"dataframe_split": {"columns": IRIS_COLUMNS, "data": data}}),
                           content_type="application/json")
    assert response.status_code == 200, response.content
    assert response.json()["predictions"] == forest.predict(rows).tolist()


@pytest.mark.django_db
@needs_sandbox()
def test_hist_gradient_boosting_with_missing_values_is_served_by_the_model_itself(personas: dict[str, Any],
                                                                                  tmp_path: Path) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    X, y = _iris()
    X = X.copy()
    X.iloc[::5, 2] = np.nan
    model = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(X, y)
    deployment, client = _deploy_mlflow(personas, tmp_path, "iris-hgb", model, X, trusted=(
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",))
    assert deployment.serving_kind == "mlflow" and "no probes for" in _log(deployment), _log(deployment)
    rows = _random_rows(X, 500, seed=4)
    rows.iloc[::2, 2] = np.nan
    data = [[None if v != v else v for v in row] for row in rows.to_numpy().tolist()]
    response = client.post("/api/v1/serve/iris-hgb/dev/invocations",
                           json.dumps({"dataframe_split": {"columns": IRIS_COLUMNS, "data": data}}),
                           content_type="application/json")
    assert response.status_code == 200, response.content
    assert response.json()["predictions"] == model.predict(rows).tolist()


@pytest.mark.django_db
@needs_sandbox()
def test_a_binary_logistic_regression_is_served_by_the_fast_path_and_equal_on_its_reference_set(
        personas: dict[str, Any], tmp_path: Path) -> None:
    """The most common model there is: its ONNX form is proven on the whole reference set and on rows on and just
    beside its decision boundary, then serves; every reference row answered as MLflow (the model itself) answers."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(5)
    X = pd.DataFrame({"tenure": rng.random(3000) * 60, "spend": rng.random(3000) * 100,
                      "visits": rng.integers(0, 20, 3000).astype("float64")})
    y = ((X.spend / 100 + X.tenure / 60 + rng.normal(0, 0.2, 3000)) > 1).astype(int)
    model = LogisticRegression(max_iter=500).fit(X, y)
    reference = tmp_path / "reference.csv"
    X.to_csv(reference, index=False)
    deployment, client = _deploy_mlflow(personas, tmp_path, "binary-lr", model, X, reference=reference)
    log = _log(deployment)
    assert deployment.serving_kind == "onnx", log
    assert "3,000 reference" in log and "decision-boundary probes" in log and " 0 mismatches" in log, log
    body = {"dataframe_split": {"columns": list(X.columns), "data": X.to_numpy().tolist()}}
    response = client.post("/api/v1/serve/binary-lr/dev/invocations", json.dumps(body),
                           content_type="application/json")
    assert response.status_code == 200, response.content
    assert response.json()["predictions"] == model.predict(X).tolist()
