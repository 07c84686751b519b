"""Decision-boundary probes for linear classifiers (issue 32): every probe sits on one side of a boundary by more
than the rounding bound of the model's own margin, so the double-precision conversion must agree on all of them
and a float32 one is caught, whatever the features' scale. A row exactly on a boundary is decided by rounding (BLAS's
summation order) in the model itself, so it is not a probe: the benchmark's logistic regression lost the fast path to
61 such rows out of 3,500 although its float64 conversion agrees on every row with a side."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from registry.deployments.services import compare_predictions
from registry.sandbox import child


def _onnx(model: Any, width: int, double: bool) -> Any:
    import onnxruntime
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    kind = DoubleTensorType if double else FloatTensorType
    onx = convert_sklearn(model, initial_types=[("input", kind([None, width]))],
                          options={id(model): {"zipmap": False}}, target_opset=17)
    session = onnxruntime.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda rows: session.run(None, {"input": rows.astype(np.float64 if double else np.float32)})[0].ravel()


@pytest.mark.parametrize("case", ["binary", "multiclass", "large-scale"])
def test_probes_have_a_side_and_catch_float32_but_pass_float64(case: str) -> None:
    from sklearn.datasets import load_iris, make_classification
    from sklearn.linear_model import LogisticRegression

    if case == "multiclass":
        X, y = load_iris(return_X_y=True)
    else:
        X, y = make_classification(n_samples=2000, n_features=20, random_state=0)
        if case == "large-scale":
            X = X * 1e6
    model = LogisticRegression(max_iter=5000).fit(X, y)
    probes, info = child.linear_probes(model, X[:500], 100_000)
    planes = 1 if case != "multiclass" else 3
    assert info == {"boundaries": planes} and len(probes) == min(len(X), 500) * 6 * planes
    # every probe is off its boundary by more than the rounding bound of the model's own margin
    margins = np.abs(model.decision_function(probes))
    if margins.ndim == 1:
        assert (margins > 0).all()
    native = model.predict(probes)
    assert compare_predictions(native, _onnx(model, X.shape[1], double=True)(probes))[0].sum() == 0
    assert compare_predictions(native, _onnx(model, X.shape[1], double=False)(probes))[0].sum() > 100


def test_rows_exactly_on_the_boundary_are_rounding_ties_even_for_the_model_itself() -> None:
    """Why they are left out: on them the model's answer depends on summation order (here: the same scores
    computed row by row against in one matrix product), so no conversion can be held to it."""
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    X, y = make_classification(n_samples=2000, n_features=20, random_state=0)
    model = LogisticRegression(max_iter=1000).fit(X, y)
    w, c = model.coef_[0], model.intercept_[0]
    on = X[:500] - ((X[:500] @ w + c) / (w @ w))[:, None] * w[None, :]
    by_matrix = (on @ w + c) > 0
    by_sum = np.array([sum(float(a) * float(b) for a, b in zip(row, w, strict=True)) + c > 0 for row in on])
    assert (by_matrix != by_sum).any(), "on the boundary, two summation orders disagree on some rows"
    assert np.abs(on @ w + c).max() < 1e-12
