"""The model host's one-row shortcut (``child.fast_predictor``): a forest's trees summed without joblib, a linear
classifier's scores without its input validation. It is used only once proven bit for bit against the model's own
``predict`` on probe rows, and then must answer every row as the model does; one that answers otherwise is refused.
The last test serves a forest from a real sandboxed host, one row at a time, against the estimator's own answers."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LogisticRegression

from registry.sandbox import child

X, Y = make_classification(n_samples=600, n_features=8, n_informative=5, n_classes=3, random_state=0)
FRAME = pd.DataFrame(X, columns=[f"x{i}" for i in range(8)])


def _models() -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "logistic, three classes": LogisticRegression(max_iter=2000).fit(FRAME, Y),
            "logistic, two text classes": LogisticRegression(max_iter=2000).fit(FRAME, np.where(Y > 0, "yes", "no")),
            "random forest classifier": RandomForestClassifier(n_estimators=25, random_state=0, n_jobs=1).fit(FRAME, Y),
            "extra trees, text classes": ExtraTreesClassifier(n_estimators=10, random_state=0).fit(FRAME, Y.astype(str)),
            "random forest regressor": RandomForestRegressor(n_estimators=10, random_state=0).fit(FRAME, X[:, 0] * 3),
        }


@pytest.mark.parametrize("name", list(_models()))
def test_a_proven_shortcut_answers_every_row_as_the_model_does(name: str) -> None:
    model = _models()[name]
    warnings.filterwarnings("ignore", message="X does not have valid feature names")
    fast, why = child.fast_predictor(model, X[:2])
    assert fast is not None, why
    rng = np.random.default_rng(1)
    fresh = np.concatenate([rng.normal(size=(300, 8)) * 3, X[:100]])
    if hasattr(model, "estimators_"):  # rows at and beside every split, which the proof did not start from
        probes, _ = child.tree_probes(model, X[200:210], 2000, rng)
        fresh = np.concatenate([fresh, probes[np.isfinite(probes).all(axis=1)]])
    own = np.asarray(model.predict(fresh))
    answer = np.asarray(fast(fresh))
    assert answer.dtype == own.dtype and np.array_equal(answer, own)
    for i in range(0, len(fresh), 37):  # one row at a time, as a real-time request comes
        one, own_one = np.asarray(fast(fresh[i:i + 1])), np.asarray(model.predict(fresh[i:i + 1]))
        assert one.dtype == own_one.dtype and np.array_equal(one, own_one)


def test_a_shortcut_that_answers_otherwise_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _models()["logistic, three classes"]
    honest = child._linear_scores

    def off_by_rounding(m: Any) -> Any:
        real = honest(m)
        return lambda matrix, proba=False: real(matrix, proba=proba) + (1e-12 if proba else 0)

    monkeypatch.setattr(child, "_linear_scores", off_by_rounding)
    fast, why = child.fast_predictor(model, X[:2])
    assert fast is None and why == "the shortcut answered otherwise than the model on probe rows"


def test_models_the_shortcut_does_not_cover_keep_their_own_predict() -> None:
    class Thresholded(LogisticRegression):
        def predict(self, X: Any) -> Any:
            return (self.predict_proba(X)[:, 1] > 0.9).astype(int)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        custom = Thresholded(max_iter=2000).fit(FRAME, Y > 0)
        two_outputs = RandomForestRegressor(n_estimators=5, random_state=0).fit(FRAME, np.c_[X[:, 0], X[:, 1]])
    assert child.fast_predictor(custom, X[:2]) == (None, "no shortcut covers this model")
    assert child.fast_predictor(two_outputs, X[:2]) == (None, "no shortcut covers this model")
    assert child.fast_predictor(_models()["random forest classifier"], X[:2] * np.nan)[0] is None


def test_a_sandboxed_host_serves_a_forest_row_by_row_as_the_estimator_does(tmp_path: Path) -> None:
    """A real bubblewrap host of an MLflow forest: numeric frames one row at a time (the shortcut proven on the
    first), a row with a missing value included (the estimator's own predict answers that one)."""
    import mlflow.sklearn

    from registry.sandbox import hosts

    model = _models()["random forest classifier"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.sklearn.save_model(model, str(tmp_path / "forest"), input_example=FRAME.head(3),
                                  skops_trusted_types=["sklearn.tree._tree.Tree"])

    def materialise(dest: Path) -> tuple[str, Path, dict[str, Any]]:
        shutil.copytree(tmp_path / "forest", dest / "model")
        return "mlflow", dest / "model", {"trusted_types": ["sklearn.tree._tree.Tree"]}

    host = hosts.ModelHost("fast-forest", materialise, label="forest")
    columns, kinds = list(FRAME.columns), ["double"] * 8
    try:
        rng = np.random.default_rng(2)
        rows = np.concatenate([X[:40], rng.normal(size=(40, 8)) * 2])
        answers = [host.predict_frame(rows[i:i + 1], columns, kinds, timeout=120)[0] for i in range(len(rows))]
        assert answers == np.asarray(model.predict(rows)).tolist()
        missing = rows[3:4].copy()
        missing[0, 2] = np.nan  # scikit-learn's forests route missing values themselves: the estimator answers it
        assert host.predict_frame(missing, columns, kinds, timeout=30) == model.predict(missing).tolist()
        assert host.predict_frame(X[5:6], columns, kinds, timeout=30) == model.predict(X[5:6]).tolist()
    finally:
        host.stop()
