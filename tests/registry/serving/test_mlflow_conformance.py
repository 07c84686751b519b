"""Conformance with MLflow's own scoring server (issue 20's acceptance).

The same models, saved with the idioms MLflow's documentation shows, are served by ``mlflow models serve
--env-manager local`` and by the portal (uploaded, scanned, deployed, scored through the production entry point),
and both get the same requests: every input format and content type, params, missing, extra and mistyped columns,
nulls, empty bodies. Both must answer with the same status class; where both answer 200 the predictions are equal
(floats within 1e-9 relative); every portal error carries an ``error_code``, MLflow's own where MLflow gives one.

The models are spread over three files (``SPLIT``), so that both test processes share the set-up. Each MLflow server
is started once per module (all in parallel, while the portal deploys) and each portal deployment is made once per
module, inside a transaction rolled back at the end. Gaps outside the fast path's own
parser (``registry/serving/protocol.py``) are marked ``xfail(strict=True)`` with the difference in the reason.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.conftest import PASSWORD, EntryPointClient, clean_env, free_port, needs_sandbox

pytestmark = [pytest.mark.slow, pytest.mark.django_db,
              needs_sandbox()]

SERVER_START_SECONDS = 300.0
REQUEST_SECONDS = 60.0


# --- the models, each saved with one of MLflow's documented idioms ------------------------------------------------

@dataclass
class Spec:
    """A model as both servers get it: how it is saved, and what its requests look like."""

    name: str
    flavor: str
    idiom: str
    build: Callable[[Path], None]  # saves the MLflow model into the given folder
    tensor: bool = False  # requests are rows without names (a tensor signature)
    params: dict[str, Any] = field(default_factory=dict)  # the params it declares, with valid values
    needs_trust: str = ""  # why an approver trusts what it loads (code, or skops types)
    serving_kind: str = ""  # what the portal chose (filled in at deployment)
    rows: Callable[[int, int], Any] | None = None  # n random rows of its inputs (seed), for the bulk comparison
    probes: bool = False  # a scikit-learn tree model: its split thresholds are probed too
    log: str = ""  # the deployment's log


def _numeric_frame(n: int = 200) -> tuple[Any, Any]:
    import pandas as pd

    rng = np.random.default_rng(3)
    X = pd.DataFrame({"tenure": rng.random(n) * 60, "spend": rng.random(n) * 100,
                      "visits": rng.integers(0, 20, n)})
    y = ((X.spend / 100 + X.tenure / 60 + rng.normal(0, 0.2, n)) > 1).astype(int)
    return X, y


def _mixed_frame(n: int = 300) -> tuple[Any, Any]:
    import pandas as pd

    rng = np.random.default_rng(7)
    X = pd.DataFrame({"plan": rng.choice(["basic", "premium", "gold"], n), "age": rng.integers(18, 80, n),
                      "spend": rng.random(n) * 100})
    y = ((X.plan == "premium") | (X.spend > 60)).astype(int)
    return X, y


def _lr(folder: Path, *, signature: str) -> None:
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    X, y = _numeric_frame()
    model = LogisticRegression(max_iter=500).fit(X, y)
    if signature == "inferred":
        mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(X, model.predict(X)),
                                  input_example=X.head(3))
    elif signature == "example":
        mlflow.sklearn.save_model(model, str(folder), input_example=X.head(3))
    elif signature == "params":
        mlflow.sklearn.save_model(model, str(folder),
                                  signature=infer_signature(X, model.predict(X), params={"threshold": 0.5}),
                                  input_example=(X.head(3), {"threshold": 0.5}))
    else:  # tensor: fitted on a numpy matrix, as a model trained outside pandas
        matrix = X.to_numpy(dtype="float64")
        model = LogisticRegression(max_iter=500).fit(matrix, y)
        mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(matrix, model.predict(matrix)),
                                  input_example=matrix[:3])


def _rf(folder: Path) -> None:
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.ensemble import RandomForestClassifier

    X, y = _numeric_frame()
    model = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0).fit(X, y)
    # MLflow 3 saves scikit-learn models with skops, which asks for the tree type to be named as trusted.
    mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(X),  # input only
                              skops_trusted_types=["sklearn.tree._tree.Tree"])


def _pipeline(folder: Path) -> None:
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    X, y = _mixed_frame()
    pipe = Pipeline([("prep", ColumnTransformer([("onehot", OneHotEncoder(handle_unknown="ignore"), ["plan"]),
                                                 ("scale", StandardScaler(), ["age", "spend"])])),
                     ("clf", LogisticRegression())]).fit(X, y)
    mlflow.sklearn.save_model(pipe, str(folder), signature=infer_signature(X, pipe.predict(X)),
                              input_example=X.head(3))


def _labels(folder: Path) -> None:
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    X, y = _numeric_frame()
    labels = np.where(y == 1, "churn", "stay")
    model = LogisticRegression(max_iter=500).fit(X, labels)
    mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(X, model.predict(X)),
                              input_example=X.head(3))


def _xgb(folder: Path) -> None:
    import mlflow.xgboost
    import xgboost
    from mlflow.models import infer_signature

    X, y = _numeric_frame()
    model = xgboost.XGBClassifier(n_estimators=10, max_depth=3, n_jobs=1).fit(X, y)
    mlflow.xgboost.save_model(model, str(folder), signature=infer_signature(X, model.predict(X)),
                              input_example=X.head(3))


def _lgbm(folder: Path) -> None:
    import lightgbm
    import mlflow.lightgbm

    X, y = _numeric_frame()
    model = lightgbm.LGBMClassifier(n_estimators=10, num_leaves=7, n_jobs=1, verbose=-1).fit(X, y)
    mlflow.lightgbm.save_model(model, str(folder), input_example=X.head(3))  # input example only


def _onnx(folder: Path) -> None:
    import mlflow.onnx
    from mlflow.models import infer_signature
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LinearRegression

    X, _y = _numeric_frame()
    matrix = X.to_numpy(dtype="float32")
    model = LinearRegression().fit(matrix, X.spend * 0.5 + X.tenure)
    onx = convert_sklearn(model, initial_types=[("X", FloatTensorType([None, 3]))], target_opset=17)
    import onnxruntime

    session = onnxruntime.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    output = session.run(None, {"X": matrix})[0]
    mlflow.onnx.save_model(onx, str(folder), signature=infer_signature(matrix, output), input_example=matrix[:3])


def _with_constant(frame: Any) -> Any:
    """The frame with statsmodels' intercept column first, as ``statsmodels.api.add_constant`` makes it."""
    return frame.assign(const=1.0)[["const", *frame.columns]]


def _statsmodels(folder: Path) -> None:
    import mlflow.statsmodels
    import statsmodels.api as sm
    from mlflow.models import infer_signature

    X, _y = _numeric_frame()
    X = _with_constant(X)
    results = sm.OLS(X.spend * 0.5 + X.tenure, X).fit()
    mlflow.statsmodels.save_model(results, str(folder), signature=infer_signature(X, results.predict(X)),
                                  input_example=X.head(3))


MODEL_CODE = '''
import mlflow
from mlflow.pyfunc import PythonModel


class Scaled(PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input["x"] * (params or {}).get("factor", 2) + model_input["y"]


mlflow.models.set_model(Scaled())
'''


def _pyfunc(folder: Path) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import infer_signature

    code = folder.parent / f"{folder.name}_code.py"
    code.write_text(MODEL_CODE)
    X = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [0.5, 0.25, 0.125]})
    mlflow.pyfunc.save_model(str(folder), python_model=str(code), input_example=(X, {"factor": 2}),
                             signature=infer_signature(X, X["x"] * 2 + X["y"], params={"factor": 2}))


IRIS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def _iris(missing: bool = False) -> tuple[Any, Any]:
    from sklearn.datasets import load_iris

    data = load_iris(as_frame=True)
    X = data.data.copy()
    X.columns = IRIS
    if missing:
        X.iloc[::4, 1] = np.nan
        X.iloc[1::6, 3] = np.nan
    return X, data.target


def _iris_rows(n: int, seed: int, *, missing: bool = False, columns: list[str] | None = None) -> Any:
    """Random rows over iris' ranges, to 3 decimals (as people type them), some on the data's own values."""
    import pandas as pd

    X, _y = _iris()
    X = X[columns or IRIS]
    rng = np.random.default_rng(seed)
    rows = pd.DataFrame(rng.uniform(X.min().to_numpy(), X.max().to_numpy(), size=(n, X.shape[1])).round(3),
                        columns=X.columns)
    rows.iloc[::10] = X.sample(len(rows.iloc[::10]), replace=True, random_state=seed).to_numpy()
    if missing:
        rows.iloc[::3, 1] = np.nan
        rows.iloc[1::7, -1] = np.nan
    return rows


def _iris_forest(folder: Path) -> None:
    """The issue's model: a RandomForestClassifier(n_estimators=50) on iris, saved the docs' way."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.ensemble import RandomForestClassifier

    X, y = _iris()
    model = RandomForestClassifier(n_estimators=50, random_state=0).fit(X, y)
    mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(X, model.predict(X)),
                              input_example=X.head(5), skops_trusted_types=["sklearn.tree._tree.Tree"])


def _forest_missing(folder: Path) -> None:
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.ensemble import RandomForestRegressor

    X, _y = _iris(missing=True)
    target = X.sepal_length * 0.3 + X.petal_length.fillna(2.0)
    X = X.drop(columns=["petal_length"])
    model = RandomForestRegressor(n_estimators=20, random_state=0).fit(X, target)
    mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(X, model.predict(X)),
                              input_example=X.head(5), skops_trusted_types=["sklearn.tree._tree.Tree"])


def _boosted_missing(folder: Path) -> None:
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.ensemble import HistGradientBoostingClassifier

    X, y = _iris(missing=True)
    model = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(X, y)
    mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(X, model.predict(X)),
                              input_example=X.head(5), skops_trusted_types=[
                                  "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"])


KNN_TYPES = ["sklearn.metrics._dist_metrics.EuclideanDistance64", "sklearn.neighbors._kd_tree.KDTree"]


def _knn(folder: Path) -> None:
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.neighbors import KNeighborsClassifier

    X, y = _iris()
    X = X[IRIS[:2]]
    model = KNeighborsClassifier().fit(X, y)
    mlflow.sklearn.save_model(model, str(folder), signature=infer_signature(X, model.predict(X)),
                              input_example=X.head(5), skops_trusted_types=KNN_TYPES)


def _unsigned(folder: Path) -> None:
    """No signature and no input example: MLflow serves it with no schema (positional inputs)."""
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression

    X, y = _iris()
    model = LogisticRegression(max_iter=1000).fit(X[IRIS[:2]].to_numpy(), y)
    mlflow.sklearn.save_model(model, str(folder))


DATETIME_CODE = """
import mlflow
from mlflow.pyfunc import PythonModel


class Calendar(PythonModel):
    def predict(self, context, model_input, params=None):
        when = model_input["when"]
        return when.dt.dayofweek * 100.0 + when.dt.hour + when.dt.minute / 60 + model_input["amount"] / 7


mlflow.models.set_model(Calendar())
"""

FRAME_CODE = """
import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class Scores(PythonModel):
    def predict(self, context, model_input, params=None):
        total = model_input["x"] + model_input["y"]
        return pd.DataFrame({"label": np.where(total > 1, "high", "low"), "score": total * 0.5})


mlflow.models.set_model(Scores())
"""

DICT_CODE = """
import mlflow
from mlflow.pyfunc import PythonModel


class Columns(PythonModel):
    def predict(self, context, model_input, params=None):
        x, y = model_input["x"], model_input["y"]
        return {"total": (x + y).tolist(), "ratio": (x / (y.abs() + 1)).tolist()}


mlflow.models.set_model(Columns())
"""

SIGNATURE_ONLY_CODE = """
import mlflow
from mlflow.pyfunc import PythonModel


class Lengths(PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input["text"].str.len() * (params or {}).get("times", 1)


mlflow.models.set_model(Lengths())
"""

WORDS = ["churn", "stay", "gold plan", "premium", "día", 'naïve, "quoted"', "x"]


def _code(folder: Path, text: str) -> str:
    code = folder.parent / f"{folder.name}_code.py"
    code.write_text(text)
    return str(code)


def _xy_rows(n: int, seed: int) -> Any:
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x": (rng.random(n) * 4 - 2).round(4), "y": (rng.random(n) * 4 - 2).round(4)})


def _when_rows(n: int, seed: int) -> Any:
    """Datetimes as people send them (ISO text), and an amount."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    start = np.datetime64("2025-01-01T00:00:00")
    when = start + rng.integers(0, 365 * 24 * 60, n).astype("timedelta64[m]")
    return pd.DataFrame({"when": pd.Series(when).dt.strftime("%Y-%m-%dT%H:%M:%S"),
                         "amount": (rng.random(n) * 500).round(2)})


def _datetime_pyfunc(folder: Path) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import infer_signature

    X = _when_rows(5, 1)
    X["when"] = pd.to_datetime(X["when"])  # a datetime column, as a frame read from a database has it
    out = X["when"].dt.dayofweek * 100.0 + X["when"].dt.hour + X["amount"] / 7
    mlflow.pyfunc.save_model(str(folder), python_model=_code(folder, DATETIME_CODE),
                             signature=infer_signature(X, out), input_example=X.head(3))


def _frame_pyfunc(folder: Path) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import infer_signature

    X = _xy_rows(5, 1)
    out = pd.DataFrame({"label": ["high"] * 5, "score": X.x * 0.5})
    mlflow.pyfunc.save_model(str(folder), python_model=_code(folder, FRAME_CODE),
                             signature=infer_signature(X, out), input_example=X.head(3))


def _dict_pyfunc(folder: Path) -> None:
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    X = _xy_rows(5, 1)
    mlflow.pyfunc.save_model(str(folder), python_model=_code(folder, DICT_CODE), signature=infer_signature(X),
                             input_example=X.head(3))


def _signature_only_pyfunc(folder: Path) -> None:
    """A signature (one string column, one param) written by hand, and no input example."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=Schema([ColSpec("long")]),
                               params=ParamSchema([ParamSpec("times", "long", 1)]))
    mlflow.pyfunc.save_model(str(folder), python_model=_code(folder, SIGNATURE_ONLY_CODE), signature=signature)


def _text_rows(n: int, seed: int) -> Any:
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame({"text": [WORDS[i] * int(k) for i, k in zip(rng.integers(0, len(WORDS), n),
                                                                   rng.integers(1, 4, n), strict=True)]})


SPECS = [
    Spec("conf-lr", "sklearn", "signature inferred from input and output", lambda f: _lr(f, signature="inferred")),
    Spec("conf-lr-example", "sklearn", "input example only", lambda f: _lr(f, signature="example")),
    Spec("conf-lr-params", "sklearn", "with params", lambda f: _lr(f, signature="params"),
         params={"threshold": 0.5}),
    Spec("conf-lr-tensor", "sklearn", "tensor-based (numpy)", lambda f: _lr(f, signature="tensor"), tensor=True),
    Spec("conf-rf", "sklearn", "input-only signature", _rf,
         needs_trust="scikit-learn's own tree storage, saved by MLflow with skops"),
    Spec("conf-pipeline", "sklearn", "signature inferred from input and output (strings and numbers)", _pipeline),
    Spec("conf-labels", "sklearn", "signature inferred from input and output (string labels)", _labels),
    Spec("conf-xgb", "xgboost", "signature inferred from input and output", _xgb),
    Spec("conf-lgbm", "lightgbm", "input example only", _lgbm,
         needs_trust="LightGBM's own booster and classifier types, saved by MLflow with skops"),
    Spec("conf-onnx", "onnx", "tensor-based (float32)", _onnx, tensor=True),
    Spec("conf-pyfunc", "python_function", "models from code, with params", _pyfunc, params={"factor": 2},
         needs_trust="Reviewed the model's code: arithmetic only"),
    Spec("conf-statsmodels", "statsmodels", "signature inferred from input and output", _statsmodels,
         needs_trust="An OLS fit from our own notebook; statsmodels' pickle"),
    Spec("conf-iris-forest", "sklearn", "the issue's RandomForest(n_estimators=50) on iris", _iris_forest,
         needs_trust="scikit-learn's own tree storage", rows=lambda n, seed: _iris_rows(n, seed), probes=True),
    Spec("conf-forest-missing", "sklearn", "a forest regressor trained with missing values, NaN in its example",
         _forest_missing, needs_trust="scikit-learn's own tree storage", probes=True,
         rows=lambda n, seed: _iris_rows(n, seed, missing=True, columns=[c for c in IRIS if c != "petal_length"])),
    Spec("conf-boosted-missing", "sklearn", "gradient-boosted trees trained with missing values", _boosted_missing,
         needs_trust="scikit-learn's own boosted tree storage", rows=lambda n, seed: _iris_rows(n, seed, missing=True)),
    Spec("conf-knn", "sklearn", "KNN on two iris columns", _knn, needs_trust="scikit-learn's own KD tree",
         rows=lambda n, seed: _iris_rows(n, seed, columns=IRIS[:2])),
    Spec("conf-unsigned", "sklearn", "no signature, no input example", _unsigned, tensor=True,
         rows=lambda n, seed: _iris_rows(n, seed, columns=IRIS[:2])),
    Spec("conf-datetime", "python_function", "a datetime input column (from a frame read from a database)",
         _datetime_pyfunc, needs_trust="Reviewed the model's code: date arithmetic only", rows=_when_rows),
    Spec("conf-frame-out", "python_function", "returns a DataFrame of two columns (a label and a score)",
         _frame_pyfunc, needs_trust="Reviewed the model's code: arithmetic only", rows=_xy_rows),
    Spec("conf-dict-out", "python_function", "returns a dict of two columns", _dict_pyfunc,
         needs_trust="Reviewed the model's code: arithmetic only", rows=_xy_rows),
    Spec("conf-signature-only", "python_function", "a signature with one input column and params, no input example",
         _signature_only_pyfunc, params={"times": 2}, needs_trust="Reviewed the model's code: string lengths only",
         rows=_text_rows),
]
BY_NAME = {s.name: s for s in SPECS}
# `make test` hands whole files to its two test processes, so the models are spread over three files, each starting
# MLflow's servers and making the portal's deployments for its own models only: this one, and the two named here
# (which import every test of this file and keep their own models' cases; tests/registry/serving/conftest.py). A
# model named in neither is this file's.
SPLIT = {
    "test_mlflow_conformance_trees": ["conf-rf", "conf-xgb", "conf-lgbm", "conf-iris-forest", "conf-forest-missing",
                                      "conf-boosted-missing", "conf-knn"],
    "test_mlflow_conformance_pyfunc": ["conf-pyfunc", "conf-statsmodels", "conf-unsigned", "conf-datetime",
                                       "conf-frame-out", "conf-dict-out", "conf-signature-only"],
}
CONFORMANCE_MODELS = [s.name for s in SPECS if not any(s.name in names for names in SPLIT.values())]


def _numeric_rows(n: int, seed: int) -> Any:
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame({"tenure": (rng.random(n) * 60).round(4), "spend": (rng.random(n) * 100).round(4),
                         "visits": rng.integers(0, 20, n)})


for _name in ("conf-lr", "conf-lr-example", "conf-lr-params", "conf-rf", "conf-labels", "conf-xgb", "conf-lgbm"):
    BY_NAME[_name].rows = _numeric_rows
# No threshold probes for conf-rf: its "visits" input is an integer column, which MLflow (rightly) refuses to fill
# with the fractional split points; the iris forests carry the probes.
BY_NAME["conf-lr-tensor"].rows = lambda n, seed: _numeric_rows(n, seed).astype("float64").T.reset_index(drop=True).T
# The onnx flavor (a float32 tensor): the same rows, which MLflow and the portal both narrow to float32.
BY_NAME["conf-onnx"].rows = BY_NAME["conf-lr-tensor"].rows


def _example(spec: Spec) -> Any:
    """Three rows as a DataFrame (integer column names for a tensor model)."""
    import pandas as pd

    if spec.name == "conf-pyfunc":
        return pd.DataFrame({"x": [1.5, 4.0, -2.0], "y": [0.5, 0.0, 1.25]})
    if spec.name in ("conf-frame-out", "conf-dict-out", "conf-datetime", "conf-signature-only"):
        assert spec.rows is not None
        return spec.rows(3, 5).reset_index(drop=True)
    if spec.name == "conf-iris-forest":  # the issue's own row first: MLflow answers 1
        return pd.DataFrame([[6.042, 2.194, 4.95, 1.461], [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], columns=IRIS)
    if spec.name == "conf-knn":  # the issue's [5.9, 3.0]: MLflow answers 2
        return pd.DataFrame([[5.9, 3.0], [5.1, 3.5], [6.7, 3.0]], columns=IRIS[:2])
    if spec.name == "conf-unsigned":
        return pd.DataFrame([[5.1, 3.5], [5.9, 3.0], [6.7, 3.0]])
    if spec.rows is not None and spec.name.startswith(("conf-forest", "conf-boosted")):
        return spec.rows(3, 11).reset_index(drop=True)
    if spec.name == "conf-pipeline":
        return _mixed_frame()[0].iloc[10:13].reset_index(drop=True)
    X = _numeric_frame()[0].iloc[10:13].reset_index(drop=True)
    if spec.name == "conf-statsmodels":
        return _with_constant(X)
    return pd.DataFrame(X.to_numpy(dtype="float64")) if spec.tensor else X


# --- the requests -------------------------------------------------------------------------------------------------

JSON = "application/json"
Request = tuple[str | None, bytes]  # content type (None: no header), body


def _values(frame: Any) -> list[list[Any]]:
    return json.loads(frame.to_json(orient="values", double_precision=15))


def _records(frame: Any) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records", double_precision=15))


def _split(frame: Any, **extra: Any) -> Request:
    payload = {"dataframe_split": {"columns": list(frame.columns), "data": _values(frame)}, **extra}
    return JSON, json.dumps(payload).encode()


def _j(payload: Any) -> Request:
    return JSON, json.dumps(payload).encode()


def _first_numeric(frame: Any) -> Any:
    return next((c for c in frame.columns if frame[c].dtype.kind in "fiu"), None)


def _int_column(frame: Any) -> Any:
    return next((c for c in frame.columns if frame[c].dtype.kind in "iu"), None)


def _with_value(frame: Any, column: Any, value: Any) -> Request | None:
    if column is None:
        return None  # the model has no such column
    payload = {"columns": list(frame.columns), "data": _values(frame)}
    payload["data"][0][list(frame.columns).index(column)] = value
    return _j({"dataframe_split": payload})


def _parquet(frame: Any) -> Request:
    buffer = io.BytesIO()
    frame.rename(columns=str).to_parquet(buffer)
    return "application/vnd.apache.parquet", buffer.getvalue()


def _param(spec: Spec, valid: bool) -> dict[str, Any]:
    name, value = next(iter(spec.params.items())) if spec.params else ("factor", 2)
    return {name: value * 5 if valid else "not a number"}


CASES: dict[str, Callable[[Spec, Any], Request | None]] = {
    "dataframe_split": lambda s, f: _split(f),
    "dataframe_split, columns in another order": lambda s, f: _split(f[list(reversed(f.columns))]),
    "dataframe_split, no column names": lambda s, f: _j({"dataframe_split": {"data": _values(f)}}),
    "dataframe_split, integer column names": lambda s, f: _j(
        {"dataframe_split": {"columns": list(range(f.shape[1])), "data": _values(f)}}),
    "dataframe_records": lambda s, f: _j({"dataframe_records": _records(f)}),
    "instances as records": lambda s, f: _j({"instances": _records(f)}),
    "instances as rows": lambda s, f: _j({"instances": _values(f)}),
    "inputs as rows": lambda s, f: _j({"inputs": _values(f)}),
    "inputs as records": lambda s, f: _j({"inputs": _records(f)}),
    "inputs as named tensors": lambda s, f: _j({"inputs": {str(c): f[c].tolist() for c in f.columns}}),
    "text/csv": lambda s, f: ("text/csv", f.to_csv(index=False).encode()),
    "text/csv, charset": lambda s, f: ("text/csv; charset=utf-8", f.to_csv(index=False).encode()),
    "parquet": lambda s, f: _parquet(f),
    "json, charset": lambda s, f: ("application/json; charset=utf-8", _split(f)[1]),
    "params valid": lambda s, f: _split(f, params=_param(s, True)),
    "params of the wrong type": lambda s, f: _split(f, params=_param(s, False)),
    "params unknown": lambda s, f: _split(f, params={"no_such_param": 1}),
    "a missing column": lambda s, f: None if s.tensor else _split(f.drop(columns=[f.columns[0]])),
    "a missing column, records": lambda s, f: None if s.tensor else _j(
        {"dataframe_records": _records(f.drop(columns=[f.columns[0]]))}),
    "an extra column": lambda s, f: None if s.tensor else _split(f.assign(zzz_extra=1.0)),
    "an extra column, records": lambda s, f: None if s.tensor else _j(
        {"dataframe_records": _records(f.assign(zzz_extra=1.0))}),
    "a row too wide": lambda s, f: _j({"inputs": [[*row, 1.0] for row in _values(f)]}),
    "text in a number column": lambda s, f: _with_value(f, _first_numeric(f), "abc"),
    "a number as a string": lambda s, f: _with_value(f, _first_numeric(f), "1.5"),
    "a boolean in a number column": lambda s, f: _with_value(f, _first_numeric(f), True),
    "a fraction in an integer column": lambda s, f: (None if _int_column(f) is None
                                                     else _with_value(f, _int_column(f), 1.5)),
    "a whole float in an integer column": lambda s, f: (None if _int_column(f) is None
                                                        else _with_value(f, _int_column(f), 3.0)),
    "a number in a string column": lambda s, f: None if "plan" not in f else _with_value(f, "plan", 7),
    "a null number": lambda s, f: _with_value(f, _first_numeric(f), None),
    "a null string": lambda s, f: None if "plan" not in f else _with_value(f, "plan", None),
    "an empty body": lambda s, f: (JSON, b""),
    "no rows": lambda s, f: _j({"dataframe_split": {"columns": list(f.columns), "data": []}}),
    "invalid JSON": lambda s, f: (JSON, b"{not json"),
    "no known key": lambda s, f: _j({"data": _values(f)}),
    "two keys": lambda s, f: _j({"dataframe_split": {"columns": list(f.columns), "data": _values(f)},
                                 "instances": _records(f)}),
    "an empty CSV": lambda s, f: ("text/csv", b""),
    "an empty Parquet body": lambda s, f: ("application/vnd.apache.parquet", b""),
    "application/xml": lambda s, f: ("application/xml", b"<rows/>"),
    "text/plain": lambda s, f: ("text/plain", _split(f)[1]),
    # No Content-Type at all is left out: MLflow 3.17's server answers it 500 (a crash), so there is no reference.
    "a charset other than UTF-8": lambda s, f: ("application/json; charset=latin-1", _split(f)[1]),
}

# (model, case) -> the difference where the portal still answers otherwise than MLflow. strict: once the portal
# answers as MLflow does, the marker has to go. A case given as "*" stands for every case of that model.
GAPS: dict[tuple[str, str], str] = {}
ERROR_CODE_GAPS: dict[tuple[str, str], str] = {}


def _params(gaps: dict[tuple[str, str], str]) -> list[Any]:
    out = []
    for spec in SPECS:
        for case in CASES:
            gap = gaps.get((spec.name, case)) or gaps.get((spec.name, "*"))
            marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
            out.append(pytest.param(spec.name, case, id=f"{spec.name}-{case}", marks=marks))
    return out


# --- MLflow's servers and the portal's deployments, once per module -------------------------------------------------

@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    folder: Path


def _archive(folder: Path) -> Path:
    archive = folder.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.rglob("*"):
            zf.write(path, Path("model") / path.relative_to(folder))
    return archive


def _wait_up(server: Server, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.url} exited with {server.proc.returncode}: "
                               f"{server.log.read_text()[-2000:]}")
        try:
            if requests.get(server.url.replace("/invocations", "/ping"), timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{server.url} did not answer within {SERVER_START_SECONDS:.0f}s: "
                       f"{server.log.read_text()[-2000:]}")


def _serve_command(folder: Path, port: int) -> list[str]:
    """What ``mlflow models serve -m FOLDER --env-manager local -h 127.0.0.1 -p PORT -w 1`` runs: MLflow's CLI
    builds this uvicorn command of its scoring server (``mlflow.pyfunc.scoring_server.get_cmd``) and waits on it in a
    second process, which answers nothing and costs each server about 7 s of CPU to boot (measured: 15.2 s against
    8.4 s a server, tree CPU at /ping, two servers, load 12 to 18). Here the same command runs without that parent."""
    from mlflow.pyfunc import scoring_server

    command, _env = scoring_server.get_cmd(str(folder), port, "127.0.0.1", None, 1)  # type: ignore[arg-type]
    return ["bash", "-c", f"exec {command}"]


def _serve_env(env: dict[str, str], folder: Path) -> dict[str, str]:
    """``env`` plus the variables ``get_cmd`` sets for the scoring server (the model's path and the request timeout)."""
    from mlflow.pyfunc import scoring_server

    _command, command_env = scoring_server.get_cmd(str(folder), None, "127.0.0.1", None, 1)  # type: ignore[arg-type]
    return {**env, **{k: v for k, v in command_env.items() if os.environ.get(k) != v}}


def _selected(request: pytest.FixtureRequest) -> list[Spec]:
    """The models the selected tests use (all of them in a full run): only those are saved, served and deployed."""
    names = {item.callspec.params.get("name") for item in request.session.items
             if item.module is request.module and hasattr(item, "callspec")}
    return [spec for spec in SPECS if spec.name in names] or SPECS


@pytest.fixture(scope="module")
def mlflow_servers(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Each model saved, and ``mlflow models serve`` started on it at once (it boots while the next model is
    saved and the portal deploys them); each is waited for on first use."""
    work = tmp_path_factory.mktemp("mlflow-serve")
    env = clean_env(MLFLOW_DISABLE_TELEMETRY="1", MLFLOW_TRACKING_URI=f"file://{work / 'mlruns'}",
                    PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                    OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    servers: dict[str, Server] = {}
    try:
        for spec in _selected(request):
            folder = work / spec.name
            spec.build(folder)
            port = free_port()
            log = work / f"{spec.name}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(_serve_command(folder, port), cwd=work, env=_serve_env(env, folder),
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            servers[spec.name] = Server(proc, f"http://127.0.0.1:{port}/invocations", log, folder)
        yield servers
    finally:
        for server in servers.values():
            if server.proc.poll() is None:
                os.killpg(server.proc.pid, signal.SIGTERM)
        for server in servers.values():
            try:
                server.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait(timeout=10)


@dataclass
class Portal:
    client: EntryPointClient
    refused: dict[str, str]  # model -> why the portal refused it (upload, scan or deployment)


@pytest.fixture
def fresh_serving_cache() -> None:
    """Overrides the registry's per-test reset: the module's deployments and their model hosts serve every test."""


@pytest.fixture(scope="module")
def portal(django_db_setup: Any, django_db_blocker: Any, mlflow_servers: dict[str, Server],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    """Every model uploaded, scanned (the custom pyfunc trusted by an approver), deployed to dev; all of it rolled
    back when the module is done."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.db import transaction
    from django.test import override_settings

    from portal import services as portal_services
    from portal.models import Membership, Team
    from portal.roles import APPROVER, DATA_SCIENTIST, sync_roles
    from registry.scanning.findings import UploadRejected
    from registry.serving import runtime, views
    from registry.versions import services
    from registry.versions.localfiles import LocalUpload
    from tests.registry.conftest import deploy_now

    store = tmp_path_factory.mktemp("checkpoints")
    with django_db_blocker.unblock(), override_settings(STORAGES={**_storages(), "audit_checkpoints": {
            "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": store}}}):
        atomic = transaction.atomic()
        atomic.__enter__()
        try:
            _exchanges.clear()
            _bulk_answers.clear()
            runtime.cache.clear()
            views._auth_cache.clear()
            views._model_cache.clear()
            sync_roles()
            team, _ = Team.objects.get_or_create(slug="acme", defaults={"name": "Acme"})
            users = {}
            for username, role in (("conf-ds", DATA_SCIENTIST), ("conf-approver", APPROVER)):
                user = get_user_model().objects.create_user(username=username, password=PASSWORD,
                                                            email=f"{username}@example.invalid")
                user.groups.add(Group.objects.get(name=role))
                Membership.objects.get_or_create(team=team, user=user)
                users[role] = user
            ds = users[DATA_SCIENTIST]
            refused: dict[str, str] = {}
            for spec in SPECS:
                if spec.name not in mlflow_servers:
                    continue
                archive = _archive(mlflow_servers[spec.name].folder)
                model = services.model_register(name=spec.name, team=team, actor=ds)
                try:
                    version = services.version_upload(model=model, upload=LocalUpload(archive, archive.name),
                                                      reference=None, meta=services.UploadMetadata(), actor=ds)
                except UploadRejected as exc:
                    refused[spec.name] = "upload: " + "; ".join(f.message for f in exc.findings)
                    continue
                if version.trust_state == "pending" and spec.needs_trust:
                    version = services.version_trust_decide(version=version, trust=True, reason=spec.needs_trust,
                                                            actor=users[APPROVER])
                version = services.version_scan(version_id=version.pk)
                if version.status != "ready":
                    refused[spec.name] = f"scan: {version.status}: {version.status_detail}"
                    continue
                try:
                    deployment = deploy_now(version, ds)
                    spec.serving_kind = deployment.serving_kind
                    spec.log = "\n".join(entry["message"] for entry in deployment.log)
                except AssertionError as exc:
                    refused[spec.name] = f"deployment: {exc}"
            _token, plaintext = portal_services.token_create(user=ds, name="conformance", actor=ds)
            yield Portal(EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {plaintext}"), refused)
        finally:
            runtime.cache.clear()
            views._auth_cache.clear()
            views._model_cache.clear()
            transaction.set_rollback(True)
            atomic.__exit__(None, None, None)


def _storages() -> dict[str, Any]:
    from django.conf import settings

    return dict(settings.STORAGES)


_ready: set[str] = set()


def _server(servers: dict[str, Server], name: str) -> Server:
    server = servers[name]
    if name not in _ready:
        _wait_up(server, time.monotonic() + SERVER_START_SECONDS)
        _ready.add(name)
    return server


# --- the comparison -----------------------------------------------------------------------------------------------

def _same(a: Any, b: Any, detail: str, path: str = "predictions") -> None:
    where = (path, a, b, detail)
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), where
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), where
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, detail, f"{path}[{i}]")
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], detail, f"{path}.{key}")
    else:
        assert a == b, where


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)  # MLflow writes NaN, which only the standard library reads
    except ValueError:
        return None


# (model, case) -> the exchange, for the module's lifetime: the status test and the error-code test look at the same
# request to the same two servers (both deterministic), so it is made once, by whichever of them runs first.
_exchanges: dict[tuple[str, str], tuple[Any, Any, str]] = {}


def _exchange(name: str, case: str, portal: Portal, servers: dict[str, Server]) -> tuple[Any, Any, str]:
    """The same request to MLflow's server and to the portal: both responses, and a line describing them."""
    spec = BY_NAME[name]
    if name in portal.refused:
        pytest.fail(f"the portal refused {name} ({spec.flavor}, {spec.idiom}): {portal.refused[name]}")
    request = CASES[case](spec, _example(spec))
    if request is None:
        pytest.skip("not applicable to this model")
    made = _exchanges.get((name, case))
    if made is not None:
        return made
    content_type, body = request
    server = _server(servers, name)
    headers = {"Content-Type": content_type} if content_type is not None else {}
    theirs = requests.post(server.url, data=body, headers=headers, timeout=REQUEST_SECONDS)
    ours = portal.client.post(f"/api/v1/serve/{name}/dev/invocations", body, content_type=content_type or "")
    detail = (f"{spec.flavor} ({spec.idiom}, served as {spec.serving_kind}), {case}: MLflow {theirs.status_code} "
              f"{theirs.content[:300]!r}; portal {ours.status_code} {ours.content[:300]!r}")
    _exchanges[(name, case)] = (theirs, ours, detail)
    return theirs, ours, detail


@pytest.mark.parametrize(("name", "case"), _params(GAPS))
def test_same_status_class_and_predictions(name: str, case: str, portal: Portal,
                                           mlflow_servers: dict[str, Server]) -> None:
    theirs, ours, detail = _exchange(name, case, portal, mlflow_servers)
    assert theirs.status_code // 100 == ours.status_code // 100, detail
    mine = _json(ours.content)
    assert isinstance(mine, dict), detail
    if theirs.status_code == 200:
        _same(_json(theirs.content)["predictions"], mine["predictions"], detail)
        assert mine["model_version"] == 1, detail
        assert len(mine["prediction_ids"]) == len(mine["predictions"]) or not isinstance(mine["predictions"], list)


@pytest.mark.parametrize(("name", "case"), _params(ERROR_CODE_GAPS))
def test_errors_carry_mlflows_error_code(name: str, case: str, portal: Portal,
                                         mlflow_servers: dict[str, Server]) -> None:
    theirs, ours, detail = _exchange(name, case, portal, mlflow_servers)
    if theirs.status_code == 200 or ours.status_code == 200:
        pytest.skip("no error to compare (the status test compares the answers)")
    mine = _json(ours.content)
    assert isinstance(mine, dict) and mine.get("error_code") and mine.get("message"), detail
    assert mine["error"]["code"] and mine["error"]["message"], detail  # the contract's error object beside it
    reference = _json(theirs.content)
    if isinstance(reference, dict) and reference.get("error_code"):
        assert mine["error_code"] == reference["error_code"], detail


# --- 10,000 random rows (plus split-threshold probes for tree models), in real time and in batch ---------------------

BULK_ROWS = 10_000
REQUEST_ROWS = 5_000  # a few large requests, not thousands of small ones
BULK = [s.name for s in SPECS if s.rows is not None]


def _bulk(spec: Spec, folder: Path) -> Any:
    """The spec's 10,000 random rows; for a scikit-learn tree model, followed by rows at and just around every
    split threshold of the fitted trees (read from the saved model, as the portal's sandbox reads them)."""
    import mlflow.sklearn
    import pandas as pd

    from registry.sandbox import child

    assert spec.rows is not None
    rows = spec.rows(BULK_ROWS, 2026).reset_index(drop=True)
    if not spec.probes:
        return rows
    model = mlflow.sklearn.load_model(str(folder))
    bases = rows.dropna().to_numpy(dtype="float64")[:500]
    probes, _info = child.tree_probes(model, bases, 20_000, np.random.default_rng(7))
    return pd.concat([rows, pd.DataFrame(probes, columns=rows.columns)], ignore_index=True)


def _cells(frame: Any) -> list[list[Any]]:
    return [[None if isinstance(v, float) and math.isnan(v) else v for v in row]
            for row in frame.astype(object).to_numpy().tolist()]


def _bulk_body(spec: Spec, part: Any) -> bytes:
    if spec.tensor:
        return json.dumps({"inputs": _cells(part)}).encode()
    return json.dumps({"dataframe_split": {"columns": [str(c) for c in part.columns], "data": _cells(part)}}).encode()


def _as_rows(predictions: Any, n: int) -> list[Any]:
    """MLflow's answer one per row: a dict of columns (a model returning a dict) becomes the rows' records."""
    if isinstance(predictions, dict):
        assert all(isinstance(v, list) and len(v) == n for v in predictions.values()), predictions
        return [{k: v[i] for k, v in predictions.items()} for i in range(n)]
    return list(predictions)


# model -> its bulk rows and MLflow's answers to them: the real-time, CSV and Parquet comparisons of a model score the
# same rows against the same answers, so MLflow's server is asked once per model (and the probes read once).
_bulk_answers: dict[str, tuple[Any, list[Any]]] = {}


def _bulk_and_answers(spec: Spec, server: Server) -> tuple[Any, list[Any]]:
    """The spec's bulk rows (``_bulk``) and MLflow's predictions for them; a copy of the rows, which callers may
    change."""
    if spec.name not in _bulk_answers:
        frame = _bulk(spec, server.folder)
        _bulk_answers[spec.name] = (frame, _mlflow_predictions(spec, frame, server))
    frame, expected = _bulk_answers[spec.name]
    return frame.copy(), expected


def _mlflow_predictions(spec: Spec, frame: Any, server: Server) -> list[Any]:
    answers: list[Any] = []
    for start in range(0, len(frame), REQUEST_ROWS):
        theirs = requests.post(server.url, data=_bulk_body(spec, frame.iloc[start:start + REQUEST_ROWS]),
                               headers={"Content-Type": JSON}, timeout=REQUEST_SECONDS * 4)
        assert theirs.status_code == 200, theirs.content[:500]
        answers += _as_rows(_json(theirs.content)["predictions"], len(frame.iloc[start:start + REQUEST_ROWS]))
    return answers


@pytest.mark.parametrize("name", BULK)
def test_ten_thousand_rows_and_threshold_probes_agree_in_real_time(name: str, portal: Portal,
                                                                   mlflow_servers: dict[str, Server]) -> None:
    spec = BY_NAME[name]
    if name in portal.refused:
        pytest.fail(f"the portal refused {name}: {portal.refused[name]}")
    server = _server(mlflow_servers, name)
    frame, expected = _bulk_and_answers(spec, server)
    ours: list[Any] = []
    for start in range(0, len(frame), REQUEST_ROWS):
        answer = portal.client.post(f"/api/v1/serve/{name}/dev/invocations",
                                    _bulk_body(spec, frame.iloc[start:start + REQUEST_ROWS]), content_type=JSON)
        assert answer.status_code == 200, answer.content[:500]
        ours += _as_rows(_json(answer.content)["predictions"], len(frame.iloc[start:start + REQUEST_ROWS]))
    _same(expected, ours, f"{name} served as {spec.serving_kind}, {len(frame)} rows; deployment log: {spec.log}")


def _result_columns(expected: list[Any], input_columns: list[str], job: Any) -> dict[str, str]:
    """Which result column holds which part of the answer: a record answer's keys get a column each, named as the
    key (``key_2`` where an input column has its name); one prediction per row has the prediction column."""
    if expected and isinstance(expected[0], dict):
        taken = {*input_columns, job.prediction_id_column}
        return {key: key if key not in taken else f"{key}_2" for key in expected[0]}
    return {"": job.prediction_column}


def _batch_job(name: str, frame: Any, spec: Spec, folder: Path, fmt: str) -> tuple[Any, list[str]]:
    """The rows as a batch file with the user's own headers (positional models included) and an id column, scored
    by the batch services in this process; the job and the file's columns."""
    from django.contrib.auth import get_user_model

    from registry.batch import services as batch
    from registry.models import RegisteredModel
    from tests.registry.batch.test_batch import run_inline

    own = frame.copy()
    if spec.tensor:
        own.columns = [f"input {i}" for i in range(own.shape[1])]  # the user's own headers
    own.insert(0, "row_id", [f"r{i}" for i in range(len(own))])
    path = folder / f"rows.{fmt}"
    if fmt == "csv":
        own.to_csv(path, index=False)
    else:
        own.to_parquet(path, index=False)
    user = get_user_model().objects.get(username="conf-ds")
    job = batch.batch_submit(model=RegisteredModel.objects.get(name=name), environment="dev", path=path,
                             filename=path.name, actor=user,
                             options=batch.BatchOptions(id_column="row_id", max_error_share=0.0))
    job = run_inline(job)
    if job.status != "done" and job.errors_blob is not None:
        from registry.storage import verified_local_path

        with verified_local_path(job.errors_blob) as errors:
            pytest.fail(f"{job.error}: {errors.read_text()[:1000]}")
    assert job.status == "done", (job.status, job.error)
    return job, [str(c) for c in own.columns]


@pytest.mark.parametrize("name", BULK)
def test_ten_thousand_rows_and_threshold_probes_agree_in_batch(name: str, portal: Portal,
                                                               mlflow_servers: dict[str, Server],
                                                               tmp_path: Path) -> None:
    """The same rows as a CSV batch file, every prediction equal to MLflow's; a DataFrame or dict answer written as
    one column per key of MLflow's JSON answer, under a header that names them."""
    import csv as csv_module

    from registry.batch import services as batch_services
    from registry.storage import verified_local_path

    spec = BY_NAME[name]
    if name in portal.refused:
        pytest.fail(f"the portal refused {name}: {portal.refused[name]}")
    server = _server(mlflow_servers, name)
    frame, expected = _bulk_and_answers(spec, server)
    job, input_columns = _batch_job(name, frame, spec, tmp_path, "csv")
    with verified_local_path(job.result_blob) as result:
        text = result.read_text()
    reader = csv_module.reader(io.StringIO(text))
    header = next(reader)
    body = list(reader)
    assert len(body) == len(frame)
    where = _result_columns(expected, input_columns, job)
    assert header == [*input_columns, *where.values(), job.prediction_id_column], header
    assert batch_services.job_prediction_columns(job) == list(where.values())  # as the job's page and API say
    assert all(len(row) == len(header) for row in body)  # no answer spills into other fields
    written = [dict(zip(header, row, strict=True)) for row in body]
    for i, (row, value) in enumerate(zip(written, expected, strict=True)):
        for key, column in where.items():
            _same_cell(row[column], value[key] if key else value, (i, key, spec.log))


def _same_cell(cell: str, value: Any, where: Any) -> None:
    """A CSV cell against MLflow's JSON value."""
    if isinstance(value, float):
        assert cell == "" if math.isnan(value) else math.isclose(float(cell), value, rel_tol=1e-9,
                                                                  abs_tol=1e-12), (where, cell, value)
    elif value is None:
        assert cell == "", (where, cell, value)
    elif isinstance(value, bool):
        assert cell == ("true" if value else "false"), (where, cell, value)
    elif isinstance(value, (dict, list)):
        assert json.loads(cell) == value, (where, cell, value)
    else:
        assert cell == str(value), (where, cell, value)


PARQUET_BULK = ["conf-frame-out", "conf-dict-out", "conf-signature-only", "conf-datetime", "conf-onnx"]


@pytest.mark.parametrize("name", PARQUET_BULK)
def test_ten_thousand_rows_agree_in_a_parquet_batch(name: str, portal: Portal, mlflow_servers: dict[str, Server],
                                                   tmp_path: Path) -> None:
    """The same rows as a Parquet batch file: every prediction equal to MLflow's, a DataFrame or dict answer as
    one typed column per key of MLflow's JSON answer."""
    import pyarrow.parquet as pq

    from registry.storage import verified_local_path

    spec = BY_NAME[name]
    if name in portal.refused:
        pytest.fail(f"the portal refused {name}: {portal.refused[name]}")
    server = _server(mlflow_servers, name)
    frame, expected = _bulk_and_answers(spec, server)
    job, input_columns = _batch_job(name, frame, spec, tmp_path, "parquet")
    with verified_local_path(job.result_blob) as result:
        table = pq.read_table(result)
    where = _result_columns(expected, input_columns, job)
    assert table.column_names == [*input_columns, *where.values(), job.prediction_id_column], table.column_names
    assert table.num_rows == len(frame)
    for key, column in where.items():
        values = table.column(column).to_pylist()
        assert not any(isinstance(v, str) and v.startswith("{") for v in values[:5]), values[:5]  # no JSON cell
        _same([row[key] if key else row for row in expected], values, f"{name}: {column}; {spec.log}")


@pytest.mark.parametrize("name", ["conf-lr", "conf-lr-params"])
def test_binary_logistic_regressions_are_served_by_the_proven_fast_path(name: str, portal: Portal,
                                                                        mlflow_servers: dict[str, Server]) -> None:
    """The common case keeps the fast path once proven (so the protocol cases above, params of the wrong type
    among them, are answered by the fast path's own parser and checks, as MLflow answers them)."""
    spec = BY_NAME[name]
    if name in portal.refused:
        pytest.fail(f"the portal refused {name}: {portal.refused[name]}")
    assert spec.serving_kind == "onnx", spec.log
    assert "decision-boundary probes" in spec.log and " 0 mismatches" in spec.log, spec.log


@pytest.mark.parametrize("name", ["conf-frame-out"])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_record_answer_keeps_its_columns_when_a_whole_chunk_fails(name: str, fmt: str, portal: Portal,
                                                                    mlflow_servers: dict[str, Server],
                                                                    tmp_path: Path, settings: Any) -> None:
    """A file cut into many small chunks, one stretch of rows (whole chunks) refused by the model's signature: the
    refused rows get an empty cell under each of the answer's columns, no row has more or fewer fields than the
    header, and every scored row holds MLflow's answer."""
    import csv as csv_module

    import pyarrow.parquet as pq
    from django.contrib.auth import get_user_model

    from registry.batch import services as batch
    from registry.models import RegisteredModel
    from registry.storage import verified_local_path
    from tests.registry.batch.test_batch import run_inline

    if name in portal.refused:
        pytest.fail(f"the portal refused {name}: {portal.refused[name]}")
    settings.PORTAL_BATCH_CHUNK_BYTES = 1024
    settings.PORTAL_BATCH_CHUNK_ROWS = 100
    server = _server(mlflow_servers, name)
    frame = _xy_rows(1000, 9).astype(object)
    bad = range(300, 600)
    frame.loc[list(bad), "x"] = "abc"
    good = [i for i in range(len(frame)) if i not in bad]
    expected = _mlflow_predictions(BY_NAME[name], frame.iloc[good].astype("float64"), server)
    own = frame.copy()
    own.insert(0, "row_id", [f"r{i}" for i in range(len(own))])
    path = tmp_path / f"rows.{fmt}"
    if fmt == "csv":
        own.to_csv(path, index=False)
    else:
        own.astype({"x": str}).to_parquet(path, index=False, row_group_size=100)
    job = batch.batch_submit(model=RegisteredModel.objects.get(name=name), environment="dev", path=path,
                             filename=path.name, actor=get_user_model().objects.get(username="conf-ds"),
                             options=batch.BatchOptions(id_column="row_id", max_error_share=1.0))
    job = run_inline(job)
    assert job.status == "done", (job.status, job.error)
    assert job.chunks_total >= 5 and job.rows_failed == len(bad), (job.chunks_total, job.rows_failed)
    header = ["row_id", "x", "y", "label", "score", job.prediction_id_column]
    with verified_local_path(job.result_blob) as result:
        if fmt == "csv":
            rows = list(csv_module.reader(io.StringIO(result.read_text())))
            assert rows[0] == header and all(len(r) == len(header) for r in rows)
            label, score = [r[3] for r in rows[1:]], [r[4] for r in rows[1:]]
        else:
            table = pq.read_table(result)
            assert table.column_names == header
            label, score = table.column("label").to_pylist(), table.column("score").to_pylist()
    empty = "" if fmt == "csv" else None
    assert all(label[i] == empty and score[i] == empty for i in bad)
    assert [label[i] for i in good] == [e["label"] for e in expected]
    _same([e["score"] for e in expected], [float(score[i]) for i in good], f"{fmt}: {job.error}")
