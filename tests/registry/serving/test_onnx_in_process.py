"""The in-process ONNX path (issue 31): what a credentialed process refuses to hand onnxruntime, what it leaves to a
sandboxed host, and the limits of what it runs itself. The attacks through the real entry points (upload, deploy,
score) are in ``tests/registry/versions/test_hostile_uploads.py``; these pin the pieces they rely on, against the
real onnxruntime."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from registry.sandbox.child import external_data_references
from registry.scanning.onnxgraph import OnnxRefused, OnnxSandboxOnly, checked_onnx, review_onnx
from registry.serving import runtime
from tests.registry import files, hostile

VICTIM = b"another team's pickle: SECRET!!!"  # 32 bytes, 8 floats


def _victim_next_to(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    victim = folder / "victim-blob"
    victim.write_bytes(VICTIM)
    return victim


def test_the_sibling_read_is_real_for_onnxruntime_and_refused_by_the_portal(tmp_path: Path) -> None:
    """Handed a path, onnxruntime reads a sparse initializer's external data from the model's folder: the bytes of
    another file come back as predictions. The portal's loader finds the reference and never opens a session."""
    import onnxruntime

    folder = tmp_path / "blobs" / "ab" / "cd"
    _victim_next_to(folder)
    forged = folder / "forged-blob"
    forged.write_bytes(hostile.onnx_reading_sibling("victim-blob", 8))
    session = onnxruntime.InferenceSession(str(forged), providers=["CPUExecutionProvider"])
    read = session.run(None, {"X": np.array([[i, 0] for i in range(8)], dtype=np.float32)})[0]
    assert read.astype("<f4").tobytes() == VICTIM  # the vector the portal must close

    with pytest.raises(OnnxRefused, match=r"sparse_initializer\[0\]\.values keeps its data in another file"):
        runtime._onnx_predictor(forged)


@pytest.mark.parametrize("build, where", [
    (lambda: hostile.onnx_reading_sibling("victim", 8), "graph.sparse_initializer[0].values"),
    (lambda: hostile.onnx_external_in_subgraph("victim"), "graph.node[3].attribute[1].g.node[0].attribute[0].t"),
    (lambda: hostile.onnx_external_in_function("victim"), "functions[0].node[0].attribute[0].t"),
], ids=["sparse initializer", "If branch", "function body"])
def test_every_external_reference_is_found_wherever_it_stands(build: object, where: str) -> None:
    import onnx

    model = onnx.load_model_from_string(build())  # type: ignore[operator]
    refs = external_data_references(model)
    assert [r["where"] for r in refs] == [where], refs
    with pytest.raises(OnnxRefused, match="keeps its data in another file"):
        checked_onnx(model.SerializeToString())


def test_references_onnx_own_walk_misses_are_found_too() -> None:
    """Sparse indices, a sparse attribute, training info, and an attribute whose type field hides its subgraph."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_model_from_string(hostile.onnx_loop())
    sparse = model.graph.sparse_initializer.add()
    sparse.values.CopyFrom(helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    sparse.indices.CopyFrom(hostile._external("indices", "victim-a", 1))
    sparse.dims.append(4)
    node = model.graph.node[0]
    attribute = node.attribute.add()
    attribute.name, attribute.type = "hidden", onnx.AttributeProto.INT  # says INT, carries a sparse tensor
    attribute.sparse_tensor.values.CopyFrom(hostile._external("attr", "victim-b", 1))
    training = model.training_info.add()
    training.initialization.initializer.append(hostile._external("train", "victim-c", 1))
    found = {r["location"]: r["where"] for r in external_data_references(model)}
    assert found == {"victim-a": "graph.sparse_initializer[0].indices",
                     "victim-b": "graph.node[0].attribute[1].sparse_tensor.values",
                     "victim-c": "training_info[0].initialization.initializer[0]"}


def test_what_the_converters_emit_runs_in_process(tmp_path: Path) -> None:
    """No false alarm on the fast path: scikit-learn models as skl2onnx converts them stay in the web worker."""
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from skl2onnx import to_onnx

    frame, y = files._data()
    X = frame.to_numpy()[:, :5]
    for estimator in (make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=3, random_state=0)),
                      make_pipeline(StandardScaler(), LogisticRegression(max_iter=200)), GradientBoostingRegressor(
                          n_estimators=3)):
        fitted = estimator.fit(X, y)
        final = fitted.steps[-1][1] if hasattr(fitted, "steps") else fitted
        options = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else None
        onnx_model = to_onnx(fitted, X[:1].astype(np.float32), target_opset=17, options=options)
        review = review_onnx(onnx_model.SerializeToString())
        assert not review.refusal and not review.sandbox_reasons, (estimator, review.sandbox_reasons)
    path = files.onnx_file(tmp_path / "lr.onnx")
    predict = runtime._onnx_predictor(path)
    assert len(predict(files._data()[0].to_numpy()[:3])) == 3


@pytest.mark.parametrize("build, operator", [(hostile.onnx_loop, "Loop"),
                                             (hostile.onnx_constant_of_shape, "ConstantOfShape")])
def test_control_flow_and_input_sized_operators_are_left_to_the_sandbox(tmp_path: Path, build: object,
                                                                       operator: str) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(build())  # type: ignore[operator]
    review = review_onnx(path.read_bytes())
    assert any(operator in reason for reason in review.sandbox_reasons), review.sandbox_reasons
    with pytest.raises(OnnxSandboxOnly, match=operator):
        runtime._onnx_predictor(path)


def _matmul_tower(depth: int) -> bytes:
    """Allowlisted operators only, work growing with the rows: G = X Xᵀ, then G·G ``depth`` times."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Transpose", ["X"], ["Xt"]), helper.make_node("MatMul", ["X", "Xt"], ["G0"])]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"G{i}", f"G{i}"], [f"G{i + 1}"]))
    nodes.append(helper.make_node("ReduceSum", [f"G{depth}", "axis1"], ["Y"], keepdims=0))
    graph = helper.make_graph(nodes, "tower", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])],
                              [helper.make_tensor("axis1", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _gather_blowup() -> bytes:
    """Allowlisted operators only: each input value picks a 100,000-wide row of a constant (800 MB for 1,024 rows)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["X"], ["idx"], to=TensorProto.INT64),
             helper.make_node("Gather", ["wide", "idx"], ["picked"], axis=0),
             helper.make_node("ReduceSum", ["picked", "axes"], ["Y"], keepdims=0)]
    graph = helper.make_graph(nodes, "blowup", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])],
                              [helper.make_tensor("wide", TensorProto.FLOAT, [1, 100_000], [0.5] * 100_000),
                               helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_an_in_process_run_ends_by_its_deadline(tmp_path: Path) -> None:
    path = tmp_path / "tower.onnx"
    path.write_bytes(_matmul_tower(400))
    predict = runtime._onnx_predictor(path)
    assert len(predict(np.ones((3, 2)), 5)) == 3
    started = time.monotonic()
    with pytest.raises(runtime.DeadlineExceeded):
        predict(np.ones((1024, 2)), 0.3)  # ~400 x 2 GFLOP: many seconds on any CPU, stopped at 0.3 + 1 s per 1,000 rows
    assert time.monotonic() - started < 0.3 + 1.024 + 1.0


def test_an_in_process_run_stops_at_the_memory_ceiling_and_the_worker_carries_on(tmp_path: Path) -> None:
    import resource

    path = tmp_path / "blowup.onnx"
    path.write_bytes(_gather_blowup())
    predict = runtime._onnx_predictor(path)
    assert predict(np.zeros((2, 2)), 5).tolist() == [100_000.0, 100_000.0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(runtime.MemoryCeiling, match="more memory than the in-process limit"):
        predict(np.zeros((1024, 2)), 5)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300, grown_mb  # the arena's cap (256 MB by default), never the 800 MB asked for
    assert predict(np.zeros((3, 2)), 5).tolist() == [100_000.0] * 3


def test_rows_are_scored_in_bounded_runs_with_the_same_answers(tmp_path: Path, settings: object) -> None:
    path = files.onnx_file(tmp_path / "lr.onnx")
    rows = np.tile(files._data()[0].to_numpy()[:7], (300, 1))  # 2,100 rows
    whole = runtime._onnx_predictor(path)(rows)
    settings.PORTAL_ONNX_MAX_ROWS_PER_RUN = 500  # type: ignore[attr-defined]
    split = runtime._onnx_predictor(path)(rows)
    assert np.array_equal(np.asarray(whole).ravel(), np.asarray(split).ravel()) and len(split) == 2100
