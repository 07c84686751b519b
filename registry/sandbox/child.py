"""The program that runs inside the sandbox (see ``bwrap.py``). It never imports Django or the portal, and it has
no secrets to give away: it sees the system, Python, and the one artifact bound at ``/model``.

    python -I child.py --limits AS,CPU,FSIZE,NOFILE inspect-onnx PATH
    python -I child.py --limits ... skops-types PATH
    python -I child.py --limits ... smoke FORMAT PATH OPTIONS_JSON
    python -I child.py --limits ... prepare-serving FORMAT PATH OPTIONS_JSON
    python -I child.py --limits ... host FORMAT PATH OPTIONS_JSON
    python -I child.py probe

One-shot modes print one JSON object on their last line of stdout: ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. ``host`` loads the model once and then answers frames on its standard input
(a Unix socket): each frame is a 4-byte big-endian length, a JSON header of that length, and, when the header says
``nbytes``, that many raw bytes (a C-ordered float64 matrix of ``shape``; ``invoke`` sends a request body as
it came). ``op`` is ``predict`` (the estimator on the matrix), ``frame`` (the matrix as MLflow's scoring server
would answer its rows, see ``_FrameScorer``), ``invoke`` (MLflow's own scoring code on the body), ``explain`` or
``ping``. Answers are frames with a JSON header only. The limits are set before anything reads the artifact, and
cannot be raised again from inside.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import struct
import sys
import time
import traceback
from typing import Any, BinaryIO

MAX_EXAMPLE_ROWS = 20
MAX_ERROR_CHARS = 2000
FRAME_HEADER = struct.Struct(">I")


def not_dumpable() -> None:
    """No other process of this uid may open this one's /proc/PID/mem, attach to it or take its descriptors (the
    kernel's ptrace access check refuses a non-dumpable target); the seccomp filter refuses turning it back on.
    Matters where several sandboxes share a uid without a pid namespace each (``confine.py``)."""
    import ctypes

    pr_set_dumpable = 4
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def set_limits(spec: str) -> None:
    """Address space (bytes), CPU seconds (0: none, for long-lived hosts), file size (bytes), open files. The
    launcher (``launch.py``) has already set the same limits on the whole sandbox before it started; this repeats
    them for a program started some other way, and can only lower them."""
    address_space, cpu, file_size, files = (int(x) for x in spec.split(","))
    wanted = [(resource.RLIMIT_AS, address_space, address_space), (resource.RLIMIT_FSIZE, file_size, file_size),
              (resource.RLIMIT_NOFILE, files, files), (resource.RLIMIT_CORE, 0, 0)]
    if cpu:
        wanted.append((resource.RLIMIT_CPU, cpu, cpu + 1))
    for which, soft, hard in wanted:
        _, current = resource.getrlimit(which)
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))


def read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def write_frame(stream: BinaryIO, header: bytes, payload: bytes = b"") -> None:
    stream.write(FRAME_HEADER.pack(len(header)) + header + payload)
    stream.flush()


def _error_text(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:MAX_ERROR_CHARS]


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write("\n" + json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def _onnx_type(elem_type: int) -> str:
    import onnx

    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return {"float": "float", "double": "double", "int64": "long", "int32": "integer", "string": "string",
            "bool": "boolean"}.get(name, name)


def external_data_references(model: Any) -> list[dict[str, str]]:
    """Every tensor of an ONNX model that keeps, or says it keeps, its data in another file, wherever it stands.

    Found twice and merged: by onnx's own walk (``external_data_helper._get_all_tensors``: graph initializers,
    attribute tensors, the subgraphs of If/Loop/Scan, function bodies) and by a walk of every message the protobuf
    holds (``ListFields``), which also reaches what onnx's walk leaves out: ``sparse_initializer`` values and
    indices, ``sparse_tensor`` attributes, ``training_info``, and an attribute whose ``type`` does not say what it
    carries. A tensor counts when its ``data_location`` is EXTERNAL or when it has any ``external_data`` entry
    (onnxruntime reads the file for the former; the latter is refused all the same). Each reference is
    ``{"tensor", "location", "where"}``, ``where`` the protobuf path (``graph.sparse_initializer[0].values``)."""
    from onnx import TensorProto
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    found: dict[tuple[str, str], dict[str, str]] = {}

    def note(tensor: Any, where: str) -> None:
        if uses_external_data(tensor) or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            found.setdefault((tensor.name, location), {"tensor": tensor.name, "location": location, "where": where})

    stack: list[tuple[Any, str]] = [(model, "model")]
    while stack:
        message, where = stack.pop()
        if isinstance(message, TensorProto):
            note(message, where.removeprefix("model."))
            continue
        for descriptor, value in message.ListFields():
            if descriptor.type != descriptor.TYPE_MESSAGE:
                continue
            if hasattr(value, "ListFields"):
                stack.append((value, f"{where}.{descriptor.name}"))
            else:
                stack.extend((item, f"{where}.{descriptor.name}[{i}]") for i, item in enumerate(value))
    for tensor in _get_all_tensors(model):
        note(tensor, "a graph initializer or an attribute")
    return list(found.values())


def inspect_onnx(path: str) -> dict[str, Any]:
    import onnx

    model = onnx.load(path, load_external_data=False)
    base = os.path.dirname(os.path.abspath(path))
    external = external_data_references(model)
    inputs = [{"name": i.name, "type": _onnx_type(i.type.tensor_type.elem_type),
               "shape": [d.dim_value or None for d in i.type.tensor_type.shape.dim]} for i in model.graph.input]
    outputs = [{"name": o.name, "type": _onnx_type(o.type.tensor_type.elem_type)} for o in model.graph.output]
    return {"ok": True, "external_data": external, "inputs": inputs, "outputs": outputs, "base": base,
            "opset": [op.version for op in model.opset_import]}


def skops_types(path: str) -> dict[str, Any]:
    """The types in a skops file outside skops' default trusted set (reads the schema only, builds no objects)."""
    import skops.io

    return {"ok": True, "untrusted": sorted(skops.io.get_untrusted_types(file=path))}


def _frame(example: Any, columns: list[str] | None) -> Any:
    import pandas as pd

    if isinstance(example, dict) and "columns" in example and "data" in example:
        return pd.DataFrame(example["data"], columns=example["columns"])
    if isinstance(example, list) and example and isinstance(example[0], dict):
        return pd.DataFrame(example)
    return pd.DataFrame(example, columns=columns)


def _type_of(dtype: Any) -> str:
    kind = getattr(dtype, "kind", "O")
    return {"f": "double", "i": "long", "u": "long", "b": "boolean", "U": "string", "S": "binary"}.get(kind, "string")


def _predict(model: Any, frame: Any, fmt: str) -> tuple[Any, Any]:
    import numpy as np

    if fmt == "onnx":
        session = model
        first = session.get_inputs()[0]
        feed = {first.name: frame.to_numpy(dtype=np.float32 if first.type == "tensor(float)" else np.float64)}
        result = session.run(None, feed)
        return np.asarray(result[0]).ravel(), None
    proba = None
    target = model
    if hasattr(target, "predict_proba"):
        try:
            proba = np.asarray(target.predict_proba(frame))
        except Exception:
            proba = None
    return np.asarray(target.predict(frame)), proba


def smoke(fmt: str, path: str, options: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    started = time.perf_counter()
    columns = options.get("columns")
    example = options.get("example")
    native_example: Any = None
    if fmt == "mlflow":
        import mlflow.pyfunc

        model = mlflow.pyfunc.load_model(path, suppress_warnings=True)
        meta = model.metadata
        if example is None and meta.saved_input_example_info:
            try:  # as MLflow itself reads it back (a float32 tensor stays float32), for pyfunc's schema checks
                native_example = meta.load_input_example(path)
            except Exception:
                native_example = None
            info = meta.saved_input_example_info
            with open(os.path.join(path, info["artifact_path"]), encoding="utf-8") as fh:
                example = json.load(fh)
            if isinstance(example, dict) and "inputs" in example and set(example) <= {"inputs", "params"}:
                example = example["inputs"]  # logged with params
        target: Any = model
        try:
            raw = model.get_raw_model()
            if _is_estimator(raw):
                target = raw
        except Exception:
            target = model
    elif fmt == "skops":
        import skops.io

        target = skops.io.load(path, trusted=options.get("trusted_types") or [])
    elif fmt in ("pickle", "joblib"):
        import joblib

        target = joblib.load(path)
    elif fmt == "onnx":
        import onnxruntime

        options_ort = onnxruntime.SessionOptions()
        options_ort.intra_op_num_threads = 1
        target = onnxruntime.InferenceSession(path, sess_options=options_ort, providers=["CPUExecutionProvider"])
    else:
        return {"ok": False, "error": f"unknown format {fmt}"}
    load_seconds = time.perf_counter() - started

    feature_names = None
    if fmt != "onnx":
        names = getattr(target, "feature_names_in_", None)
        feature_names = [str(n) for n in names] if names is not None else None
        n_features = getattr(target, "n_features_in_", None)
    else:
        shape = target.get_inputs()[0].shape
        n_features = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None
    named_example = (isinstance(example, dict) and "columns" in example) or (
        isinstance(example, list) and bool(example) and isinstance(example[0], dict))
    positional = columns is None and not feature_names and not named_example
    if columns is None:
        columns = feature_names or ([f"f{i}" for i in range(n_features)] if n_features else None)
    if example is None and fmt == "mlflow":
        example = _signature_example(model.metadata)  # a signature with named columns and no input example
        if example is not None:
            columns, positional = example["columns"], False
    if example is None:
        if not columns:
            return {"ok": False, "error": "the model does not say how many inputs it takes and no example was given"}
        example = {"columns": columns, "data": [[0.0] * len(columns)]}
    frame = _frame(example, columns).head(MAX_EXAMPLE_ROWS)
    notes = []
    if feature_names and list(frame.columns) != feature_names:
        missing = [c for c in feature_names if c not in frame.columns]
        if missing:
            # LightGBM and others rewrite feature names (spaces to underscores): match them the same way.
            normalised = {re.sub(r"[^0-9A-Za-z]+", "_", str(c)): c for c in frame.columns}
            mapping = {normalised.get(re.sub(r"[^0-9A-Za-z]+", "_", f)): f for f in feature_names}
            if None in mapping:
                return {"ok": False, "error": f"the example lacks the model's inputs {missing[:5]}"}
            frame = frame.rename(columns=mapping)
            notes.append("feature names were matched after normalising punctuation")
        frame = frame[feature_names]
    elif n_features and frame.shape[1] > n_features:
        # A model that takes an unnamed tensor: extra columns (a label, an id) are dropped from the end.
        notes.append(f"the example has {frame.shape[1]} columns and the model takes {n_features}: "
                     f"the first {n_features} were used")
        frame = frame.iloc[:, :n_features]
    started = time.perf_counter()
    if fmt == "mlflow" and not _is_estimator(target) and native_example is not None:
        predictions, proba = _as_array(target.predict(native_example)), None
        if len(predictions) == len(native_example) and len(frame) != len(predictions):
            frame = frame.head(len(predictions))
    else:
        predictions, proba = _predict(target, frame, fmt)
    predict_seconds = time.perf_counter() - started
    if len(predictions) != len(frame):
        return {"ok": False, "error": f"{len(frame)} example rows gave {len(predictions)} predictions"}
    classes = getattr(target, "classes_", None)
    return {
        "ok": True,
        "positional": positional,  # the input names below were made up here: the model takes its inputs by position
        "load_seconds": round(load_seconds, 4),
        "predict_seconds": round(predict_seconds, 4),
        "model_class": f"{type(target).__module__}.{type(target).__qualname__}",
        "inputs": [{"name": str(c), "type": _type_of(frame[c].dtype), "required": True} for c in frame.columns],
        "outputs": [{"type": _type_of(np.asarray(predictions).dtype), "required": True}],
        "example": {"columns": [str(c) for c in frame.columns], "data": frame.head(5).to_numpy().tolist()},
        "predictions": np.asarray(predictions)[:5].tolist(),
        "has_proba": proba is not None,
        "notes": notes,
        "classes": [c.item() if hasattr(c, "item") else c for c in classes] if classes is not None else None,
    }


def _signature_example(metadata: Any) -> dict[str, Any] | None:
    """One row of typed placeholders for a column signature (MLflow's ``ColSpec`` types), for a model logged with a
    signature and no input example; None for a tensor signature or none."""
    import pandas as pd

    schema = metadata.get_input_schema()
    if schema is None or schema.is_tensor_spec() or not schema.has_input_names():
        return None
    placeholders = {"double": 0.0, "float": 0.0, "integer": 0, "long": 0, "string": "a", "boolean": False,
                    "binary": b"", "datetime": pd.Timestamp("2024-01-01")}
    row = [placeholders.get(str(getattr(t, "name", t)), 0.0) for t in schema.input_types()]
    return {"columns": list(schema.input_names()), "data": [row]}


def _as_array(result: Any) -> Any:
    """A pyfunc's answer as one array: a frame or series as its values, a dict of named tensors as its first."""
    import numpy as np
    import pandas as pd

    if isinstance(result, dict) and result:
        result = next(iter(result.values()))
    if isinstance(result, (pd.DataFrame, pd.Series)):
        result = result.to_numpy()
    array = np.asarray(result)
    return array.ravel() if array.ndim > 1 and array.shape[1] == 1 else array


def _is_estimator(obj: Any) -> bool:
    """A scikit-learn-style estimator (what the raw model of the sklearn, xgboost and lightgbm flavors is), not a
    custom ``PythonModel`` (whose ``predict`` takes a context first) or anything else."""
    return hasattr(obj, "predict") and hasattr(obj, "get_params")


def _load(fmt: str, path: str, options: dict[str, Any]) -> Any:
    if fmt == "mlflow":
        import mlflow.pyfunc

        model = mlflow.pyfunc.load_model(path, suppress_warnings=True)
        try:
            raw = model.get_raw_model()
            return raw if _is_estimator(raw) else model
        except Exception:
            return model
    if fmt == "skops":
        import skops.io

        return skops.io.load(path, trusted=options.get("trusted_types") or [])
    import joblib

    return joblib.load(path)


MAX_PROBE_ROWS = 100_000
REFERENCE_FILE = "portal-reference.npy"  # the portal's reference rows, beside the model in its mount
PROBES_FILE = "probes.npy"  # what the sandbox asks the portal to compare: the inputs...
NATIVE_FILE = "native.npy"  # ...and what the model itself predicts for them


def _tree_ensemble(model: Any) -> tuple[list[Any], bool] | None:
    """(the fitted ``tree_`` objects, whether predictions are their mean) of a scikit-learn forest or tree whose
    trees compare ``float32(x) <= threshold`` with double thresholds; None for anything else."""
    from sklearn import ensemble, tree

    forests = (ensemble.RandomForestClassifier, ensemble.RandomForestRegressor, ensemble.ExtraTreesClassifier,
               ensemble.ExtraTreesRegressor)
    single = (tree.DecisionTreeClassifier, tree.DecisionTreeRegressor)
    if type(model) in forests and getattr(model, "n_outputs_", 1) == 1:
        return [e.tree_ for e in model.estimators_], True
    if isinstance(model, single) and getattr(model, "n_outputs_", 1) == 1:
        return [model.tree_], False
    return None


def _class_tensor(classes: Any) -> Any:
    import numpy as np
    from onnx import numpy_helper

    kind = np.asarray(classes).dtype.kind
    if kind in "iu":
        return numpy_helper.from_array(np.asarray(classes, dtype=np.int64), "classes")
    if kind == "f":
        return numpy_helper.from_array(np.asarray(classes, dtype=np.float64), "classes")
    if kind in "UO" and all(isinstance(c, str) for c in classes):
        import onnx

        labels: Any = [str(c).encode() for c in classes]
        return onnx.helper.make_tensor("classes", onnx.TensorProto.STRING, [len(classes)], labels)
    return None


def tree_ensemble_onnx(model: Any) -> Any:
    """A double-precision ONNX graph (``ai.onnx.ml`` TreeEnsemble, opset 5) that computes what scikit-learn
    computes: the input rounded to float32 and compared with the fitted double thresholds, missing values routed as
    each node's ``missing_go_to_left`` says, leaf values summed tree by tree in double and divided by the number of
    trees, the first largest class picked. None for a model it does not cover."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.base import is_classifier

    found = _tree_ensemble(model)
    if found is None:
        return None
    trees, averaged = found
    classifier = is_classifier(model)
    classes = getattr(model, "classes_", None)
    if classifier and (classes is None or _class_tensor(classes) is None):
        return None
    targets = len(classes) if classifier and classes is not None else 1
    features: list[Any] = []
    splits: list[Any] = []
    modes: list[Any] = []
    true_ids: list[Any] = []
    false_ids: list[Any] = []
    true_leaf: list[Any] = []
    false_leaf: list[Any] = []
    missing: list[Any] = []
    roots: list[Any] = []
    leaf_weights: list[Any] = []
    leaf_targets: list[Any] = []
    node_base = leaf_base = 0
    for fitted in trees:
        left, right = fitted.children_left, fitted.children_right
        interior = np.flatnonzero(left != -1)
        leaves = np.flatnonzero(left == -1)
        values = fitted.value[:, 0, :]
        if classifier:
            if averaged:  # each tree's predict_proba: its leaf values normalised, as scikit-learn does
                normaliser = values.sum(axis=1)
                normaliser[normaliser == 0.0] = 1.0
                values = values / normaliser[:, None]
        position = np.full(left.shape[0], -1, dtype=np.int64)
        goes_left = getattr(fitted, "missing_go_to_left", None)
        for target in range(targets):
            position[interior] = node_base + np.arange(interior.size)
            position[leaves] = leaf_base + np.arange(leaves.size)
            if interior.size == 0:  # a tree that is one leaf: one node whose both branches are that leaf
                column: list[Any]
                for column, value in ((features, 0), (splits, 0.0), (modes, 0), (true_ids, leaf_base),
                                      (false_ids, leaf_base), (true_leaf, 1), (false_leaf, 1), (missing, 0),
                                      (roots, node_base)):
                    column.append(value)
                node_base += 1
            else:
                features.extend(fitted.feature[interior].tolist())
                splits.extend(fitted.threshold[interior].tolist())
                modes.extend([0] * interior.size)
                true_ids.extend(position[left[interior]].tolist())
                false_ids.extend(position[right[interior]].tolist())
                true_leaf.extend((left[left[interior]] == -1).astype(int).tolist())
                false_leaf.extend((left[right[interior]] == -1).astype(int).tolist())
                missing.extend((np.asarray(goes_left)[interior].astype(int) if goes_left is not None
                                else np.zeros(interior.size, dtype=int)).tolist())
                roots.append(node_base)  # node 0 is scikit-learn's root and the first interior node
                node_base += interior.size
            leaf_weights.extend(values[leaves, target if classifier else 0].tolist())
            leaf_targets.extend([target] * leaves.size)
            leaf_base += leaves.size
    ensemble = helper.make_node(
        "TreeEnsemble", ["x_double"], ["scores"], domain="ai.onnx.ml", n_targets=targets, aggregate_function=1,
        post_transform=0, tree_roots=roots, nodes_featureids=features,
        nodes_splits=numpy_helper.from_array(np.asarray(splits, dtype=np.float64)),
        nodes_modes=numpy_helper.from_array(np.asarray(modes, dtype=np.uint8)),
        nodes_truenodeids=true_ids, nodes_falsenodeids=false_ids, nodes_trueleafs=true_leaf,
        nodes_falseleafs=false_leaf, nodes_missing_value_tracks_true=missing,
        leaf_targetids=leaf_targets, leaf_weights=numpy_helper.from_array(np.asarray(leaf_weights, np.float64)))
    n_features = int(model.n_features_in_)
    nodes = [helper.make_node("Cast", ["X"], ["x_float"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["x_float"], ["x_double"], to=TensorProto.DOUBLE), ensemble]
    initializers = [numpy_helper.from_array(np.asarray([float(len(trees) if averaged else 1)]), "n_trees")]
    nodes.append(helper.make_node("Div", ["scores", "n_trees"], ["mean"]))
    if classifier:
        initializers.append(_class_tensor(classes))
        label_type = initializers[-1].data_type
        nodes += [helper.make_node("ArgMax", ["mean"], ["index"], axis=1, keepdims=0, select_last_index=0),
                  helper.make_node("Gather", ["classes", "index"], ["label"], axis=0),
                  helper.make_node("Identity", ["mean"], ["probabilities"])]
        outputs = [helper.make_tensor_value_info("label", label_type, [None]),
                   helper.make_tensor_value_info("probabilities", TensorProto.DOUBLE, [None, targets])]
    else:
        nodes.append(helper.make_node("Identity", ["mean"], ["variable"]))
        outputs = [helper.make_tensor_value_info("variable", TensorProto.DOUBLE, [None, 1])]
    graph = helper.make_graph(nodes, "portal_tree_ensemble",
                              [helper.make_tensor_value_info("X", TensorProto.DOUBLE, [None, n_features])],
                              outputs, initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                         helper.make_opsetid("ai.onnx.ml", 5)],
                                   producer_name="portal")
    onnx_model.ir_version = 10
    onnx.checker.check_model(onnx_model)
    return onnx_model


def _node_paths(fitted: Any, nodes: Any) -> list[list[tuple[int, float, bool]]]:
    """For each of ``nodes``, the splits on the way from the root: (feature, threshold, went left)."""
    import numpy as np

    parent = np.full(fitted.node_count, -1, dtype=np.int64)
    interior = np.flatnonzero(fitted.children_left != -1)
    parent[fitted.children_left[interior]] = interior
    parent[fitted.children_right[interior]] = interior
    paths = []
    for node in nodes:
        path = []
        child, up = int(node), int(parent[node])
        while up != -1:
            path.append((int(fitted.feature[up]), float(fitted.threshold[up]),
                         bool(fitted.children_left[up] == child)))
            child, up = up, int(parent[up])
        paths.append(path[::-1])
    return paths


def _inside(lo: float, hi: float, value: float) -> float:
    """A value that ``float32(value)`` keeps in (lo, hi]: ``value`` when it does, else one between."""
    import numpy as np

    def fits(v: float) -> bool:
        f = float(np.float32(v))
        return lo < f <= hi

    if fits(value):
        return value
    candidates = []
    if np.isfinite(lo) and np.isfinite(hi):
        candidates.append((lo + hi) / 2)
    if np.isfinite(hi):
        candidates += [hi, hi - abs(hi) * 1e-3 - 1]
    if np.isfinite(lo):
        candidates.append(lo + abs(lo) * 1e-3 + 1)
    for candidate in candidates:
        if fits(candidate):
            return float(candidate)
    return value


def threshold_values(threshold: float) -> list[float]:
    """The values at and just around a split: t and its double neighbours, t's float32 rounding and that float's
    neighbours (scikit-learn compares ``float32(x)``); only values a request can carry (finite in float32: a split
    at infinity, missing against present, is probed with the largest float32 instead)."""
    import numpy as np

    t = float(threshold)
    largest = float(np.finfo(np.float32).max)
    if not np.isfinite(t):
        return [largest if t > 0 else -largest]
    f = np.float32(t)
    values = {t, float(np.nextafter(t, np.inf)), float(np.nextafter(t, -np.inf)), float(f),
              float(np.nextafter(f, np.float32(np.inf))), float(np.nextafter(f, np.float32(-np.inf)))}
    return sorted(v for v in values if abs(v) <= largest)


def tree_probes(model: Any, bases: Any, limit: int, rng: Any) -> tuple[Any, dict[str, Any]]:
    """Rows that reach split nodes of the fitted trees (the path's other splits satisfied, starting from a base
    row) with the split's feature at and just around its threshold, and missing there: every split node when they
    fit in ``limit`` rows, else an even sample of them (said in the report)."""
    import numpy as np

    trees, _averaged = _tree_ensemble(model) or ([], False)
    nodes = [(i, int(n)) for i, fitted in enumerate(trees) for n in np.flatnonzero(fitted.children_left != -1)]
    per_node = 7
    total = len(nodes)
    if total * per_node > limit:
        keep = rng.choice(total, size=max(1, limit // per_node), replace=False)
        nodes = [nodes[i] for i in sorted(keep)]
    by_tree: dict[int, list[int]] = {}
    for i, n in nodes:
        by_tree.setdefault(i, []).append(n)
    rows = []
    for i, node_ids in by_tree.items():
        fitted = trees[i]
        for node, path in zip(node_ids, _node_paths(fitted, node_ids), strict=True):
            base = np.array(bases[rng.integers(len(bases))], dtype=np.float64)
            lo = np.full(base.shape[0], -np.inf)
            hi = np.full(base.shape[0], np.inf)
            for feature, threshold, left in path:
                if left:
                    hi[feature] = min(hi[feature], threshold)
                else:
                    lo[feature] = max(lo[feature], threshold)
            for j in np.flatnonzero(np.isfinite(lo) | np.isfinite(hi) | ~np.isfinite(base)):
                base[j] = _inside(lo[j], hi[j], base[j] if np.isfinite(base[j]) else 0.0)
            feature = int(fitted.feature[node])
            for value in [*threshold_values(fitted.threshold[node]), np.nan]:
                row = base.copy()
                row[feature] = value
                rows.append(row)
    report = {"split_nodes": total, "split_nodes_probed": len(nodes)}
    return (np.asarray(rows) if rows else np.empty((0, len(bases[0])))), report


def knn_probes(model: Any, limit: int) -> tuple[Any, dict[str, Any]]:
    """Around neighbour ties: every training point (and so each duplicated one), and points equidistant from a
    training point and each of its nearest neighbours (midpoints), with their float32 roundings."""
    import numpy as np

    fitted = np.asarray(getattr(model, "_fit_X", np.empty((0, 0))), dtype=np.float64)
    if fitted.ndim != 2 or not fitted.size:
        return np.empty((0, int(getattr(model, "n_features_in_", 0) or 0))), {}
    k = int(getattr(model, "n_neighbors", 5))
    from sklearn.neighbors import NearestNeighbors

    neighbours = NearestNeighbors(n_neighbors=min(k + 1, len(fitted))).fit(fitted)
    index = neighbours.kneighbors(fitted, return_distance=False)
    midpoints = ((fitted[:, None, :] + fitted[index]) / 2).reshape(-1, fitted.shape[1])
    rows = np.concatenate([fitted, midpoints, midpoints.astype(np.float32).astype(np.float64)])
    rows = np.unique(rows, axis=0)
    if len(rows) > limit:
        rows = rows[np.random.default_rng(0).choice(len(rows), size=limit, replace=False)]
    return rows, {"training_points": len(fitted), "tie_points": len(midpoints)}


def linear_probes(model: Any, bases: Any, limit: int) -> tuple[Any, dict[str, Any]]:
    """Just beside a linear classifier's decision boundaries: each base row projected onto the boundary between
    every pair of classes, then moved off it to either side by 4, 1,000 and 1,000,000 times the rounding bound of
    its margin (2 n eps (sum |w_i x_i| + |c|), the float64 dot product's error bound), so that every probe has a side.

    A row left exactly on a boundary is not a probe: there the model's own answer is decided by rounding (the order
    BLAS sums in, which changes with its build and thread count), so `mlflow models serve` on another machine could
    answer either way, and a conversion that disagrees there is no more wrong than the model itself. Any margin
    past that bound has one right answer, and the conversion must give it."""
    import numpy as np

    coef = np.atleast_2d(np.asarray(model.coef_, dtype=np.float64))
    intercept = np.atleast_1d(np.asarray(model.intercept_, dtype=np.float64))
    planes = [(coef[0], intercept[0])] if coef.shape[0] == 1 else [
        (coef[a] - coef[b], intercept[a] - intercept[b]) for a in range(coef.shape[0]) for b in range(a)]
    rows = []
    bases = np.asarray(bases, dtype=np.float64)
    eps = float(np.finfo(np.float64).eps)
    for w, c in planes:
        norm = float(w @ w)
        if not norm:
            continue
        on = bases - ((bases @ w + c) / norm)[:, None] * w[None, :]
        bound = 2 * len(w) * eps * (np.abs(on) @ np.abs(w) + abs(c))
        unit = w / np.sqrt(norm)
        for factor in (4.0, 1e3, 1e6):
            off = (factor * bound / np.sqrt(norm))[:, None] * unit[None, :]
            rows += [on + off, on - off]
    probes = np.concatenate(rows) if rows else np.empty((0, bases.shape[1]))
    return probes[:limit], {"boundaries": len(planes)}


def _xgboost_model(model: Any) -> bool:
    """An XGBoost scikit-learn estimator (``XGBClassifier``, ``XGBRegressor``) with a fitted booster."""
    return type(model).__module__.startswith("xgboost") and hasattr(model, "get_booster")


def xgboost_onnx(model: Any, rows: Any) -> Any:
    """The XGBoost estimator as ONNX by onnxmltools' converter (registered with skl2onnx): a float32 ``TreeEnsemble``
    comparing ``x < split`` as XGBoost does, missing values routed as each node's default direction says. None
    when onnxmltools is not installed or cannot convert this model (its objective, its booster)."""
    try:
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
        from skl2onnx import to_onnx, update_registered_converter
        from skl2onnx.common.shape_calculator import (
            calculate_linear_classifier_output_shapes,
            calculate_linear_regressor_output_shapes,
        )
        from xgboost import XGBClassifier, XGBRegressor
    except ImportError:
        return None
    update_registered_converter(XGBClassifier, "XGBoostXGBClassifier", calculate_linear_classifier_output_shapes,
                                convert_xgboost, options={"nocl": [True, False], "zipmap": [True, False, "columns"]})
    update_registered_converter(XGBRegressor, "XGBoostXGBRegressor", calculate_linear_regressor_output_shapes,
                                convert_xgboost)
    import copy

    import onnxruntime

    # onnxmltools reads features as f0, f1…: a model fitted on named columns is converted from a copy without
    # the names (the order is the same; the portal feeds the graph in the signature's column order).
    plain = copy.deepcopy(model)
    plain.get_booster().feature_names = None
    plain.get_booster().feature_types = None
    options = {id(plain): {"zipmap": False}} if isinstance(plain, XGBClassifier) else None
    try:
        converted = to_onnx(plain, rows[:1].astype("float32"), options=options,
                            target_opset={"": 17, "ai.onnx.ml": 3})
        onnxruntime.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # an objective or booster the converter does not cover: the model serves itself
        return None
    return converted


def xgboost_probes(model: Any, bases: Any, limit: int, rng: Any) -> tuple[Any, dict[str, Any]]:
    """Rows that reach split nodes of the booster's trees (the path's other splits satisfied, from a base row) with
    the split's feature at and just around its threshold (XGBoost compares ``float32(x) < split``), and missing
    there: every split node when they fit in ``limit`` rows, else an even sample of them (said in the report)."""
    import numpy as np

    frame = model.get_booster().trees_to_dataframe()
    names = list(model.get_booster().feature_names or [f"f{i}" for i in range(bases.shape[1])])
    position = {str(name): i for i, name in enumerate(names)}
    splits = frame[frame["Feature"] != "Leaf"]
    by_id = {str(r.ID): r for r in splits.itertuples(index=False)}
    parent: dict[str, tuple[str, bool]] = {}
    for r in splits.itertuples(index=False):
        parent[str(r.Yes)] = (str(r.ID), True)
        parent[str(r.No)] = (str(r.ID), False)
    nodes = list(by_id)
    per_node = 7
    total = len(nodes)
    if total * per_node > limit:
        keep = rng.choice(total, size=max(1, limit // per_node), replace=False)
        nodes = [nodes[i] for i in sorted(keep)]
    below = np.float32(-np.inf)
    rows = []
    for node in nodes:
        row_info = by_id[node]
        feature = position.get(str(row_info.Feature))
        if feature is None:
            continue
        base = np.array(bases[rng.integers(len(bases))], dtype=np.float64)
        lo = np.full(base.shape[0], -np.inf)
        hi = np.full(base.shape[0], np.inf)
        child = node
        while child in parent:
            up, yes = parent[child]
            split = by_id[up]
            j = position.get(str(split.Feature))
            if j is not None:
                threshold = np.float32(split.Split)
                if yes:  # x < split: at most the float32 just below it
                    hi[j] = min(hi[j], float(np.nextafter(threshold, below)))
                else:  # x >= split: (lo, hi] with lo just below the split
                    lo[j] = max(lo[j], float(np.nextafter(threshold, below)))
            child = up
        for k in np.flatnonzero(np.isfinite(lo) | np.isfinite(hi) | ~np.isfinite(base)).tolist():
            base[k] = _inside(float(lo[k]), float(hi[k]), float(base[k]) if np.isfinite(base[k]) else 0.0)
        for value in [*threshold_values(float(np.float32(row_info.Split))), np.nan]:
            row = base.copy()
            row[feature] = value
            rows.append(row)
    report = {"split_nodes": total, "split_nodes_probed": len(nodes)}
    return (np.asarray(rows) if rows else np.empty((0, bases.shape[1]))), report


def probe_family(model: Any) -> str | None:
    """Which probes can find where a conversion of ``model`` would decide otherwise: ``trees`` (split
    thresholds), ``xgboost`` (the booster's split thresholds), ``neighbours`` (ties), ``linear`` (a linear
    classifier's boundaries), ``smooth`` (a linear regression, whose answer has no boundary to fall on the other
    side of); None for anything else (other boosted trees with their own threshold storage, kernels, networks,
    pipelines), which then serves itself."""
    from sklearn.base import is_classifier, is_regressor

    module = type(model).__module__
    if _tree_ensemble(model) is not None:
        return "trees"
    if _xgboost_model(model):
        return "xgboost"
    if module.startswith("sklearn.neighbors") and hasattr(model, "_fit_X"):
        return "neighbours"
    if module.startswith("sklearn.linear_model") and hasattr(model, "coef_") and hasattr(model, "intercept_"):
        if is_classifier(model):
            return "linear"
        if is_regressor(model):
            return "smooth"
    return None


def _native_predictions(model: Any, columns: list[str] | None, matrix: Any) -> Any:
    """What the model itself predicts for ``matrix``, in chunks, fed as MLflow feeds it (a frame with the
    signature's column names, or the bare matrix for a tensor signature)."""
    import numpy as np
    import pandas as pd

    parts = []
    for start in range(0, len(matrix), 20_000):
        chunk = matrix[start:start + 20_000]
        parts.append(np.asarray(model.predict(pd.DataFrame(chunk, columns=columns) if columns else chunk)))
    result: Any = np.concatenate(parts) if parts else np.empty(0)
    if result.ndim > 1 and result.shape[1] == 1:
        result = result.ravel()
    if result.dtype.kind == "O":
        if not all(isinstance(v, str) for v in result.ravel()):
            raise TypeError("the model's predictions are Python objects, not numbers or text")
        result = result.astype(str)
    return result


def prepare_serving(fmt: str, path: str, options: dict[str, Any]) -> dict[str, Any]:
    """Convert a vetted model to ONNX for the web workers, and hand the portal what it needs to prove the
    conversion: ``probes.npy`` (the portal's reference rows, the example rows, then generated probes at and around
    every split threshold of a tree model, around neighbour ties of a KNN model, on a linear classifier's decision
    boundaries) and ``native.npy`` (what the model itself predicts for each). The portal runs the ONNX form on them
    in its own process and keeps it only if every answer agrees. ONNX loading runs no Python code from the file."""
    import numpy as np

    root = path if os.path.isdir(path) else os.path.dirname(path)
    if fmt != "mlflow" and os.path.isdir(path):
        path = os.path.join(path, f"model.{fmt}")
    columns = options["columns"] or None
    try:
        rows = np.asarray(options["rows"], dtype="float64")
    except (TypeError, ValueError):
        return {"ok": True, "kind": "native", "reason": "not every input is a number, and the in-process ONNX "
                                                        "form takes one numeric matrix"}
    if rows.ndim != 2 or not rows.size:
        return {"ok": True, "kind": "native", "reason": "the example is not a table of numbers"}
    model = _load(fmt, path, options)
    if not _is_estimator(model):
        return {"ok": True, "kind": "native", "reason": "not a scikit-learn estimator, which the ONNX converter needs"}
    family = probe_family(model)
    if family is None:
        return {"ok": True, "kind": "native", "reason": f"{type(model).__name__} decides in ways the portal has no "
                                                        "probes for (only scikit-learn forests and trees, XGBoost, KNN, "
                                                        "linear models are probed), so an ONNX form could not be proven"}
    reference = np.empty((0, rows.shape[1]))
    if options.get("reference"):
        reference = np.load(os.path.join(root, options["reference"]), allow_pickle=False)
    onnx_model = tree_ensemble_onnx(model)
    form = "a double-precision tree ensemble (float32 inputs against the fitted double thresholds, as " \
           "scikit-learn compares them)"
    if family == "xgboost":
        onnx_model = xgboost_onnx(model, rows)
        if onnx_model is None:
            return {"ok": True, "kind": "native", "reason": "onnxmltools could not convert this XGBoost model"}
        form = "onnxmltools' XGBoost conversion (float32 inputs against the booster's float32 splits)"
    if onnx_model is None:
        try:
            from skl2onnx import to_onnx
            from sklearn.pipeline import Pipeline
        except ImportError:
            return {"ok": True, "kind": "native", "reason": "skl2onnx is not installed"}
        final = model.steps[-1][1] if isinstance(model, Pipeline) else model
        conversion_options = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else None
        import onnxruntime

        for dtype in ("float64", "float32"):
            # A graph skl2onnx writes may still be one onnxruntime cannot run (a double-precision tree ensemble
            # on some releases): only a graph that loads counts as converted.
            try:
                onnx_model = to_onnx(model, rows[:1].astype(dtype), options=conversion_options, target_opset=17)
                onnxruntime.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
                form = f"skl2onnx's conversion with {dtype} inputs"
                break
            except Exception:  # the other precision may convert; else the model serves natively
                onnx_model = None
                continue
    if onnx_model is None:
        return {"ok": True, "kind": "native", "reason": "no ONNX converter for this model"}
    rng = np.random.default_rng(0)
    finite_reference = reference[np.isfinite(reference).all(axis=1)] if len(reference) else reference
    bases = finite_reference[:1000] if len(finite_reference) else rows[np.isfinite(rows).all(axis=1)]
    if not len(bases):
        bases = np.zeros((1, rows.shape[1]))
    budget = max(10_000, MAX_PROBE_ROWS - len(reference))
    probe_info: dict[str, Any] = {}
    if family == "trees":
        probes, probe_info = tree_probes(model, bases, budget, rng)
        probe_kind = "split-threshold probes"
    elif family == "xgboost":
        probes, probe_info = xgboost_probes(model, bases, budget, rng)
        probe_kind = "split-threshold probes"
    elif family == "neighbours":
        probes, probe_info = knn_probes(model, budget)
        probe_kind = "neighbour-tie probes"
    elif family == "linear":
        probes, probe_info = linear_probes(model, bases, budget)
        probe_kind = "decision-boundary probes"
    else:  # a linear regression: no decision to flip, the answer moves smoothly with the input
        picked = bases[rng.integers(len(bases), size=min(budget, 2000))]
        probes = picked * (1 + rng.normal(0, 0.05, picked.shape)) + rng.normal(0, 1e-3, picked.shape)
        probe_kind = "perturbed example probes"
    probes = np.asarray(probes, dtype=np.float64).reshape(-1, rows.shape[1])
    inputs = np.concatenate([reference, rows, probes])
    missing_values = bool(np.isnan(inputs).any())
    try:
        native = _native_predictions(model, columns, inputs)
    except ValueError as exc:
        complete = np.isfinite(inputs).all(axis=1)
        if not missing_values or not complete[: len(reference) + len(rows)].all():
            return {"ok": True, "kind": "native", "reason": f"the model refused rows it was to be proven on "
                                                            f"({_error_text(exc)[:300]})"}
        # The model refuses missing values (as MLflow's server then would): prove it on complete rows only.
        probes = probes[np.isfinite(probes).all(axis=1)]
        inputs = np.concatenate([reference, rows, probes])
        missing_values = False
        native = _native_predictions(model, columns, inputs)
    out = os.path.dirname(options["output"])
    np.save(os.path.join(out, PROBES_FILE), inputs, allow_pickle=False)
    np.save(os.path.join(out, NATIVE_FILE), native, allow_pickle=False)
    with open(options["output"], "wb") as fh:
        fh.write(onnx_model.SerializeToString())
    return {"ok": True, "kind": "onnx", "form": form, "reference_rows": len(reference),
            "example_rows": len(rows), "probes": len(probes), "probe_kind": probe_kind,
            "probe_info": probe_info, "missing_values": missing_values,
            "empty_rows": _empty_rows(model, columns, rows.shape[1])}


def _empty_rows(model: Any, columns: list[str] | None, width: int) -> str:
    """What the model does with a request of no rows, as MLflow's server would feed it: ``answers`` (an empty list:
    XGBoost, LightGBM) or ``refuses`` (scikit-learn raises on zero samples, and MLflow's server answers 400)."""
    import numpy as np
    import pandas as pd

    empty = np.empty((0, width))
    try:
        answer = np.asarray(model.predict(pd.DataFrame(empty, columns=columns) if columns else empty))
    except Exception:  # whatever the model raises, MLflow's server turns into a 4xx
        return "refuses"
    return "answers" if answer.size == 0 else "refuses"


class _OnnxEstimator:
    """An uploaded ONNX graph served by a model host (one the portal keeps out of its web workers: control flow,
    shape-from-input operators): predictions for a float64 matrix, as the in-process session would give them."""

    def __init__(self, path: str) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.load_model_format", "ONNX")
        self.session = onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        first = self.session.get_inputs()[0]
        self.name, self.float32 = first.name, first.type == "tensor(float)"
        self.output = self.session.get_outputs()[0].name

    def get_params(self) -> dict[str, Any]:
        return {}

    def predict(self, matrix: Any) -> Any:
        import numpy as np

        feed = np.asarray(matrix, dtype=np.float32 if self.float32 else np.float64)
        return np.asarray(self.session.run([self.output], {self.name: feed})[0]).ravel()


def _load_for_serving(fmt: str, path: str, options: dict[str, Any]) -> Any:
    """What a web worker used to load in-process: MLflow models through pyfunc (MLflow's own input handling),
    the rest as the estimator."""
    if fmt == "onnx":
        return _OnnxEstimator(path)
    if fmt == "mlflow":
        import mlflow.pyfunc

        return mlflow.pyfunc.load_model(path, suppress_warnings=True)
    return _load(fmt, path, options)


MAX_LOGGED_CELLS = 1_000_000


class _Capture:
    """Stands in for the pyfunc model inside MLflow's own ``invocations``, keeping what it was called with."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.metadata = model.metadata
        self.data: Any = None
        self.params: Any = None

    def predict(self, data: Any, params: Any = None) -> Any:
        self.data, self.params = data, params
        return self.model.predict(data, params=params)


def _loggable(data: Any) -> tuple[list[str] | None, list[list[Any]] | None, int]:
    """The parsed input as columns and rows for the prediction log (JSON-safe), and its row count."""
    import numpy as np
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        rows = len(data)
        if rows * max(1, data.shape[1]) > MAX_LOGGED_CELLS:
            return [str(c) for c in data.columns], None, rows
        frame = data.astype(object).where(pd.notna(data), None)
        return [str(c) for c in data.columns], frame.to_numpy().tolist(), rows
    if isinstance(data, np.ndarray):
        rows = int(data.shape[0]) if data.ndim else 1
        flat = data.reshape(rows, -1) if data.ndim > 1 else data.reshape(-1, 1)
        if flat.size > MAX_LOGGED_CELLS or data.dtype.kind not in "biufUSb?":
            return None, None, rows
        return None, flat.tolist(), rows
    if isinstance(data, dict) and data and all(isinstance(v, np.ndarray) for v in data.values()):
        rows = min(int(v.shape[0]) if v.ndim else 1 for v in data.values())
        return list(map(str, data)), None, rows
    return None, None, len(data) if isinstance(data, list) else 1


def _invoke(model: Any, body: bytes, content_type: str) -> dict[str, Any]:
    """Answer a request exactly as MLflow's scoring server would (its own parsing, schema enforcement, params and
    output encoding), plus the parsed input for the prediction log."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    capture = _Capture(model)
    model_error = ""
    try:
        result = scoring_server.invocations(body, content_type, capture, model.metadata.get_input_schema())
        status, text = result.status, result.response
    except MlflowException as exc:
        status = exc.get_http_status_code()
        text = json.dumps({"error_code": exc.error_code, "message": str(exc.message)[:MAX_ERROR_CHARS]})
        trace = str(getattr(exc, "json_kwargs", {}).get("stack_trace") or "")
        if trace:  # MLflow's answer when the model itself raised: keep its last line for the prediction log
            model_error = (trace.strip().splitlines() or [""])[-1][:MAX_ERROR_CHARS]
    columns, rows, count = _loggable(capture.data) if capture.data is not None else (None, None, 0)
    return {"ok": True, "status": status, "body": text, "columns": columns, "rows": rows, "count": count,
            "model_error": model_error}


FAST_PATH_PROBE_ROWS = 1000  # rows a one-row shortcut is checked on, against the estimator's own answers
WALK_ROWS = 16  # up to this many rows, a forest's trees are walked side by side; more, one tree at a time
WALK_MAX_NODES = 2_000_000  # ...when the trees, padded to the largest, hold at most this many nodes
FAST_PATH_BASES = 20  # request rows the probes start from (a batch chunk's first rows)
FAST_PATH_PROOF_SECONDS = 1.0  # one-row checks stop after this (at least one is made)


def _forest_sum(model: Any) -> Any:
    """A scikit-learn forest's ``predict`` without its per-call machinery (joblib's ``Parallel`` over the trees,
    a warnings and config context per tree, the fitted checks of every tree): the same float32 conversion, each
    tree's ``tree_.predict`` summed in the forest's order into a float64 array and divided by the number of
    trees, as ``ForestClassifier.predict_proba`` and ``ForestRegressor.predict`` do with ``n_jobs=1``; for a
    classifier, the first largest class. None for any other model (its predict overridden, several outputs)."""
    import numpy as np
    from sklearn.ensemble import _forest

    classifier = isinstance(model, _forest.ForestClassifier)
    if (_tree_ensemble(model) is None or type(model).__module__ != "sklearn.ensemble._forest"
            or getattr(model, "n_outputs_", 0) != 1
            or (classifier and (type(model).predict is not _forest.ForestClassifier.predict
                                or type(model).predict_proba is not _forest.ForestClassifier.predict_proba))
            or (not classifier and type(model).predict is not _forest.ForestRegressor.predict)):
        return None
    trees = [e.tree_ for e in model.estimators_]
    width = int(model.n_features_in_)
    classes: Any = model.classes_ if classifier else None
    n_classes = int(model.n_classes_) if classifier else 1
    count = len(trees)

    # Every tree's nodes side by side (padded to the largest), to walk all trees at once for a few rows: each
    # step compares float32(x) with the double threshold as the trees' own code does, a leaf stays put, and the
    # leaves' values are summed in the forest's order (a running sum, not numpy's pairwise one).
    most = max(t.node_count for t in trees)
    walks = count * most <= WALK_MAX_NODES  # the side-by-side copy costs about 50 bytes a padded node
    if not walks:
        most = 1
    lefts = np.full((count, most), -1, dtype=np.intp)
    rights = np.full((count, most), -1, dtype=np.intp)
    features = np.full((count, most), -2, dtype=np.intp)
    thresholds = np.zeros((count, most), dtype=np.float64)
    values = np.zeros((count, most, n_classes), dtype=np.float64)
    for k, t in enumerate(trees if walks else []):
        n = t.node_count
        lefts[k, :n], rights[k, :n], features[k, :n], thresholds[k, :n] = (
            t.children_left, t.children_right, t.feature, t.threshold)
        values[k, :n] = t.value[:, 0, :n_classes]
    depth = max(t.max_depth for t in trees)
    which = np.arange(count)

    def walk(rows: Any) -> Any:
        at = np.zeros((rows.shape[0], count), dtype=np.intp)
        row_index = np.arange(rows.shape[0])[:, None]
        for _ in range(depth):
            feature = features[which, at]
            inner = feature >= 0
            if not inner.any():
                break
            left = rows[row_index, np.where(inner, feature, 0)] <= thresholds[which, at]
            at = np.where(inner, np.where(left, lefts[which, at], rights[which, at]), at)
        total = np.cumsum(values[which, at], axis=1)[:, -1]
        return total if classifier else total[:, 0]

    def predict(matrix: Any, *, proba: bool = False) -> Any:
        if matrix.shape[1] != width:
            raise ValueError("the rows do not have the forest's features")
        rows = np.ascontiguousarray(matrix, dtype=np.float32)
        if walks and rows.shape[0] <= WALK_ROWS:
            total = walk(rows)
        else:
            total = np.zeros((rows.shape[0], n_classes) if classifier else rows.shape[0], dtype=np.float64)
            for fitted in trees:
                out = fitted.predict(rows)
                total += out[:, :n_classes] if classifier else out[:, 0]
        total /= count
        if proba or not classifier:
            return total
        return classes.take(np.argmax(total, axis=1), axis=0)

    return predict


def _linear_scores(model: Any) -> Any:
    """A scikit-learn linear classifier's ``predict`` without its input validation and array-API dispatch (the
    bulk of its time on one row): ``X @ coef_.T + intercept_``, then the positive class where the score is
    above 0 (two classes) or the first largest score, as ``LinearClassifierMixin`` computes them. None for any
    other model."""
    import numpy as np
    from sklearn.linear_model._base import LinearClassifierMixin

    if (not isinstance(model, LinearClassifierMixin) or not type(model).__module__.startswith("sklearn.")
            or type(model).predict is not LinearClassifierMixin.predict
            or type(model).decision_function is not LinearClassifierMixin.decision_function
            or not isinstance(getattr(model, "coef_", None), np.ndarray) or model.coef_.ndim != 2
            or not isinstance(getattr(model, "classes_", None), np.ndarray)):
        return None
    coef_t, intercept, classes = model.coef_.T, model.intercept_, model.classes_

    def predict(matrix: Any, *, proba: bool = False) -> Any:
        if matrix.shape[1] != coef_t.shape[0]:
            raise ValueError("the rows do not have the model's features")
        scores = matrix @ coef_t + intercept
        if scores.shape[1] == 1:
            scores = scores.reshape(-1)
        if proba:
            return scores
        indices = (scores > 0).astype(np.intp) if scores.ndim == 1 else np.argmax(scores, axis=1)
        return classes.take(indices, axis=0)

    return predict


def fast_predictor(model: Any, bases: Any) -> tuple[Any, str]:
    """(``predict(matrix)`` giving exactly what ``model.predict`` gives on finite float64 rows, or None; why
    not). A shortcut is used only once it has answered alike, bit for bit, on probe rows that sit at the model's
    decisions (every split's threshold and its float32 neighbours for a forest, both sides of every class
    boundary for a linear model, from the request's own rows as bases) and on the bases themselves: its scores
    (probabilities, decision values) and its predictions, compared with the model's own ``predict`` and
    ``predict_proba`` or ``decision_function`` on the same rows."""
    import numpy as np

    started = time.perf_counter()
    bases = np.asarray(bases, dtype=np.float64)[:FAST_PATH_BASES]
    if bases.ndim != 2 or not len(bases) or not np.isfinite(bases).all():
        return None, "no finite rows to prove a shortcut on"
    try:
        forest, linear = _forest_sum(model), None
        if forest is None:
            linear = _linear_scores(model)
        shortcut = forest or linear
        if shortcut is None:
            return None, "no shortcut covers this model"
        rng = np.random.default_rng(0)
        probes, _report = (tree_probes(model, bases, FAST_PATH_PROBE_ROWS, rng) if forest is not None
                           else linear_probes(model, bases, FAST_PATH_PROBE_ROWS))
        probes = probes[np.isfinite(probes).all(axis=1)] if len(probes) else probes
        rows = np.concatenate([bases, probes]) if len(probes) else bases
        if forest is not None:
            own_scores = (model.predict_proba(rows) if hasattr(model, "classes_") else model.predict(rows))
        else:
            own_scores = model.decision_function(rows)
        own = np.asarray(model.predict(rows))
        scores, answer = shortcut(rows, proba=True), np.asarray(shortcut(rows))
        # One row at a time as well: the path people wait on runs on one row, and BLAS may sum otherwise for one.
        # At least one row, more while the proof stays within its time: it runs inside the first request, whose
        # deadline kills the host (and a host that is killed proving would prove again, and again).
        single, own_single = [], []
        for i in range(min(len(rows), 8)):
            if i and time.perf_counter() - started > FAST_PATH_PROOF_SECONDS:
                break
            single.append(np.asarray(shortcut(rows[i:i + 1])))
            own_single.append(np.asarray(model.predict(rows[i:i + 1])))
    except Exception as exc:
        return None, f"the shortcut could not be proven ({_error_text(exc)[:200]})"
    same = (scores.dtype == np.asarray(own_scores).dtype and np.array_equal(scores, own_scores)
            and answer.dtype == own.dtype and np.array_equal(answer, own)
            and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(single, own_single, strict=True)))
    if not same:
        return None, "the shortcut answered otherwise than the model on probe rows"
    return shortcut, ""


class _MatrixPredictor:
    """Predictions for a float64 matrix, as cheaply as gives the same answers: the estimator itself rather than
    pyfunc's wrapper (the portal has checked the columns), the bare array rather than a DataFrame once the first
    request showed both answer alike (a ColumnTransformer that picks columns by name needs the DataFrame), and then
    a shortcut past the estimator's per-call machinery once one is proven on probe rows (``fast_predictor``)."""

    def __init__(self, model: Any) -> None:
        import warnings

        self.target = model
        try:
            raw = model.get_raw_model() if hasattr(model, "get_raw_model") else None
            if _is_estimator(raw):
                self.target = raw
        except Exception:  # noqa: S110 - pyfunc's own predict then serves
            pass
        self.use_array: bool | None = None if _is_estimator(self.target) else False
        self.fast: Any = None  # ``fast_predictor``'s proven shortcut, once the bare array answers alike
        self.fast_declined = ""
        # Fitted with feature names, given an array: the same answers, and a warning nobody reads.
        warnings.filterwarnings("ignore", message="X does not have valid feature names")

    def _flat(self, result: Any) -> Any:
        import numpy as np
        import pandas as pd

        if isinstance(result, (pd.DataFrame, pd.Series)):
            result = result.to_numpy()
        return np.asarray(result).ravel()

    def __call__(self, matrix: Any, columns: list[str] | None) -> Any:
        import numpy as np
        import pandas as pd

        if self.use_array:
            finite = bool(np.isfinite(matrix).all()) if matrix.dtype.kind == "f" else False
            if self.fast is None and not self.fast_declined and finite:
                self.fast, self.fast_declined = fast_predictor(self.target, matrix)  # tried once per host
            if self.fast is not None and finite:
                return self._flat(self.fast(matrix))
            return self._flat(self.target.predict(matrix))
        by_frame = self._flat(self.target.predict(pd.DataFrame(matrix, columns=columns)))
        if self.use_array is None:
            names = getattr(self.target, "feature_names_in_", None)
            if names is not None and [str(n) for n in names] != list(columns or []):
                self.use_array = False  # the array would feed the columns in another order
                return by_frame
            try:
                by_array = self._flat(self.target.predict(matrix))
                self.use_array = by_array.dtype == by_frame.dtype and np.array_equal(by_array, by_frame)
            except Exception:
                self.use_array = False
        return by_frame


class _FrameScorer:
    """Rows of a numeric column signature, sent as one float64 matrix in the signature's order (the portal parsed
    the request), answered as MLflow's scoring server answers them where that answer is certain without MLflow's
    own parsing: a model of the scikit-learn flavor whose pyfunc ``predict`` is the estimator's ``predict``
    (``_SklearnModelWrapper``, no ``pyfunc_predict_fn``), with a signature of required ``double`` and ``long``
    columns and no type hints. MLflow's schema enforcement hands that estimator a DataFrame of the signature's
    columns in its order (float64 and int64); it gets the same here, or the bare array once the first request
    showed both answer alike (as ``_MatrixPredictor`` decides), and then a shortcut past the estimator's per-call
    machinery once it is proven bit for bit on probe rows (``fast_predictor``: a forest's trees summed without
    joblib, a linear classifier's scores without its input validation), for finite rows. For anything else
    ``reason`` says why not, and the portal sends the request to MLflow's own scoring code (``invoke``)."""

    def __init__(self, model: Any) -> None:
        import warnings

        self.estimator: Any = None
        self.names: list[str] = []
        self.kinds: list[str] = []
        self.use_array: bool | None = None
        self.fast: Any = None  # ``fast_predictor``'s proven shortcut, once the bare array answers alike
        self.fast_declined = ""
        try:
            self.reason = self._check(model)
        except Exception as exc:  # an MLflow without these internals: MLflow's own code answers
            self.reason = f"its MLflow metadata could not be read ({_error_text(exc)[:200]})"
        if self.reason:
            self.estimator = None
        warnings.filterwarnings("ignore", message="X does not have valid feature names")

    def _check(self, model: Any) -> str:
        from mlflow.pyfunc import PyFuncModel
        from mlflow.sklearn import _SklearnModelWrapper

        if not isinstance(model, PyFuncModel):
            return "not an MLflow pyfunc model"
        meta = model.metadata
        if meta._is_signature_from_type_hint() or meta._is_type_hint_from_example():
            return "its signature comes from type hints"
        if getattr(model._predict_fn, "__func__", None) is not _SklearnModelWrapper.predict:
            return "its pyfunc predict is not a scikit-learn estimator's predict"
        schema = meta.get_input_schema()
        if schema is None or schema.is_tensor_spec() or not schema.has_input_names():
            return "its signature does not name columns"
        kinds = []
        for spec in schema.inputs:
            kind = getattr(getattr(spec, "type", None), "name", None)
            if not getattr(spec, "required", False) or kind not in ("double", "long"):
                return "its signature has columns other than required double and long ones"
            kinds.append(str(kind))
        raw = model.get_raw_model()
        if not _is_estimator(raw):
            return "its raw model is not an estimator"
        self.estimator, self.names, self.kinds = raw, [str(n) for n in schema.input_names()], kinds
        return ""

    def _frame(self, matrix: Any) -> Any:
        import numpy as np
        import pandas as pd

        return pd.DataFrame({name: matrix[:, j].astype(np.int64) if kind == "long" else matrix[:, j]
                             for j, (name, kind) in enumerate(zip(self.names, self.kinds, strict=True))})

    def __call__(self, matrix: Any, columns: list[str] | None, kinds: list[str] | None) -> dict[str, Any]:
        """``{"ok": True, "predictions": [...]}`` as MLflow's JSON answer has them, or ``{"ok": False, "decline":
        why, "permanent": bool}``: permanent when the model can never be answered so; else for this request only
        (the estimator raised, or answered what MLflow's encoder writes otherwise), which MLflow then answers."""
        import numpy as np

        if self.estimator is None:
            return {"ok": False, "decline": self.reason, "permanent": True}
        if list(columns or []) != self.names or list(kinds or []) != self.kinds or matrix.ndim != 2 \
                or matrix.shape[1] != len(self.names):
            return {"ok": False, "decline": "the rows do not come in the signature's columns", "permanent": False}
        try:
            finite = bool(np.isfinite(matrix).all())
            if self.use_array and self.fast is None and not self.fast_declined and finite:
                # The bare array answers alike: a shortcut past the estimator's per-call machinery may too, once
                # proven on probe rows built from these (``fast_predictor``); tried once per host.
                self.fast, self.fast_declined = fast_predictor(self.estimator, matrix)
            if self.fast is not None and finite:
                result = np.asarray(self.fast(matrix))
            elif self.use_array:
                result = np.asarray(self.estimator.predict(matrix))
            else:
                result = np.asarray(self.estimator.predict(self._frame(matrix)))
                if self.use_array is None:
                    names = getattr(self.estimator, "feature_names_in_", None)
                    if names is not None and [str(n) for n in names] != self.names:
                        self.use_array = False
                    else:
                        try:
                            by_array = np.asarray(self.estimator.predict(matrix))
                            self.use_array = by_array.dtype == result.dtype and np.array_equal(by_array, result)
                        except Exception:
                            self.use_array = False
        except Exception as exc:
            return {"ok": False, "decline": f"the model raised ({_error_text(exc)[:200]})", "permanent": False}
        if result.ndim != 1 or len(result) != matrix.shape[0]:
            return {"ok": False, "decline": "the model answers other than one value per row", "permanent": True}
        if result.dtype.kind == "f" and not np.isfinite(result).all():
            return {"ok": False, "decline": "the answer holds NaN or infinity", "permanent": False}
        if result.dtype.kind not in "biuf" and not all(isinstance(v, str) for v in result.tolist()):
            return {"ok": False, "decline": "the answer is not numbers or text", "permanent": True}
        return {"ok": True, "frame": True, "predictions": result.tolist()}


def _json_default(value: Any) -> Any:
    """What orjson cannot write in a logged row: timestamps as ISO text (pandas' Timestamp, numpy datetimes),
    bytes as base64 (MLflow's binary columns), anything else as its text."""
    import base64

    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode()
    if hasattr(value, "item"):
        return value.item() if not hasattr(value, "dtype") or value.dtype.kind not in "Mm" else str(value)
    return str(value)


# --- Explanations (SHAP), computed here and only here: the model is a program --------------------------------

EXPLAIN_MAX_ROWS = 10_000  # rows one explain request may carry
EXPLAIN_BACKGROUND_ROWS = 100  # background rows kept for the linear and model-agnostic explainers
GLOBAL_MAX_ROWS = 1000  # reference rows explained at most for a version's global importance
GLOBAL_AGNOSTIC_ROWS = 50  # ...by the model-agnostic explainer, against
GLOBAL_AGNOSTIC_BACKGROUND = 20  # ...this many background rows, within
GLOBAL_AGNOSTIC_SECONDS = 10.0  # ...at most this many seconds
TREE_MODULES = ("sklearn.ensemble", "sklearn.tree", "xgboost", "lightgbm", "catboost")


class NoExplainer(Exception):
    """No explainer fits this model (said to the caller as a 422, with why)."""


class ExplainBudget(Exception):
    """The explanation would take longer than its budget (said to the caller as a 504, with how long)."""


def _explained_estimator(model: Any) -> Any:
    """The estimator SHAP reads: a pyfunc's raw scikit-learn-style model where it has one, else the model."""
    try:
        raw = model.get_raw_model() if hasattr(model, "get_raw_model") and not _is_estimator(model) else None
        if _is_estimator(raw):
            return raw
    except Exception:  # noqa: S110 - the pyfunc itself is then explained model-agnostically
        pass
    return model


def _xgboost_exact(shap: Any, explainer: Any) -> tuple[Any, float] | None:
    """XGBoost's own TreeSHAP (``pred_contribs``, which ``shap.TreeExplainer`` calls for XGBoost models) computes in
    float32: its path's zero and one fractions and permutation weights are floats, so a row's contributions carry
    float32 rounding gathered over every tree, and add up to its float32 margin only to a few float32 steps (about
    1e-6 for a margin near 8). The same trees, as shap itself parses them from the booster (float32 split values and
    leaf weights, which float64 holds exactly), are given to shap's own TreeSHAP as a tree dictionary, which computes
    in double precision: the attributions add up to the margin those trees give in double precision to about 1e-15.
    Rows are rounded to float32 first, as XGBoost rounds them, so each row takes XGBoost's path through every tree.
    The trees are handed over in float64: shap's C helper averages the leaves up each tree (the base value) only in
    float64, and left in float32, as shap's own parse holds them, the base value would be the base score alone.

    For a binary or single-output gradient-boosted model (``gbtree``, numeric splits); None for any other (several
    outputs, dart's weighted trees, categorical splits), which keeps XGBoost's own contributions. Also the bound the
    double-precision margin and XGBoost's float32 margin may differ by: one float32 rounding per tree added, at the
    largest magnitude a partial sum can reach."""
    import numpy as np

    ensemble = explainer.model
    booster = getattr(ensemble, "original_model", None)
    if booster is None or ensemble.num_outputs != 1 or ensemble.num_stacked_models != 1 \
            or ensemble.cat_feature_indices is not None:
        return None
    try:
        config = json.loads(booster.save_config())
        if config["learner"]["gradient_booster"]["name"] != "gbtree":
            return None
    except (KeyError, TypeError, ValueError):
        return None
    limit = ensemble.tree_limit or len(ensemble.trees)
    trees = [{"children_left": t.children_left, "children_right": t.children_right,
              "children_default": t.children_default, "features": t.features,
              "thresholds": np.asarray(t.thresholds, dtype=np.float64),
              "values": np.asarray(t.values, dtype=np.float64),
              "node_sample_weight": np.asarray(t.node_sample_weight, dtype=np.float64)}
             for t in ensemble.trees[:limit]]
    base = float(np.asarray(ensemble.base_offset, dtype=np.float64).reshape(-1)[0])
    exact = shap.TreeExplainer({"trees": trees, "base_offset": base, "input_dtype": np.float32,
                                "internal_dtype": np.float64})
    leaves = [np.abs(np.asarray(t["values"])[np.asarray(t["children_left"]) < 0]).max(initial=0.0) for t in trees]
    largest = abs(base) + float(sum(leaves))
    bound = (len(trees) + 1) * float(np.spacing(np.float32(largest)))
    return exact, bound


def _classes(model: Any) -> list[Any] | None:
    classes = getattr(model, "classes_", None)
    if classes is None:
        return None
    return [c.item() if hasattr(c, "item") else c for c in classes]


class Explainer:
    """One model's SHAP explainer: TreeExplainer (path-dependent, exact) for tree ensembles of scikit-learn,
    XGBoost, LightGBM; LinearExplainer (exact, against the background's mean) for scikit-learn linear models;
    otherwise a permutation explainer over the background, bounded by ``budget`` seconds (approximate).

    Each row's answer explains one output, which ``output`` names: a regressor's prediction; for a classifier the
    positive class (binary) or the predicted class (more classes), as the probability (scikit-learn trees), the
    margin (log-odds: XGBoost, LightGBM, gradient boosting) or the decision function (linear models). The
    attributions add up to that output minus ``base_value``."""

    def __init__(self, model: Any, columns: list[str] | None, background: Any, *, budget: float) -> None:
        import numpy as np

        self.model = _explained_estimator(model)
        self.columns = columns
        self.background: Any = None if background is None else np.asarray(background, dtype=np.float64)
        self.budget = budget
        self.classes = _classes(self.model)
        module = type(self.model).__module__
        self.family = ""
        self.reason = ""
        self.exact: tuple[Any, float] | None = None
        import shap

        self._shap = shap
        if module.startswith(TREE_MODULES) and _is_estimator(self.model):
            try:
                self.explainer = shap.TreeExplainer(self.model)
                self.family, self.method, self.approximate = "tree", "shap.TreeExplainer (path-dependent)", False
            except Exception as exc:
                self.reason = f"TreeExplainer does not read {type(self.model).__name__}: {_error_text(exc)[:200]}"
        if self.family == "tree" and module.startswith("xgboost"):
            try:
                self.exact = _xgboost_exact(shap, self.explainer)
            except Exception:  # shap cannot read these trees itself: XGBoost's own contributions serve
                self.exact = None
        if not self.family and module.startswith("sklearn.linear_model") and hasattr(self.model, "coef_"):
            if self.background is None or not len(self.background):
                self.reason = "a linear model is explained against reference rows and the version has none"
            else:
                self.explainer = shap.LinearExplainer(self.model, self.background)
                self.family, self.method, self.approximate = "linear", "shap.LinearExplainer (interventional)", False
        if not self.family:
            if self.background is None or not len(self.background):
                raise NoExplainer((self.reason + "; " if self.reason else "") + "the model-agnostic explainer "
                                  "needs reference rows to compare with, and the version has none")
            self.family, self.approximate = "agnostic", True
            self.method = "shap.KernelExplainer (model-agnostic, sampled coalitions)"
            self._function = self._agnostic_function()

    # --- outputs -----------------------------------------------------------------------------------------------

    def _frame(self, matrix: Any) -> Any:
        import pandas as pd

        names = getattr(self.model, "feature_names_in_", None)
        if self.columns and (names is not None or not hasattr(self.model, "n_features_in_")):
            return pd.DataFrame(matrix, columns=self.columns)
        return matrix

    def _agnostic_function(self) -> Any:
        """What the model-agnostic explainer explains: rows x outputs (a classifier's probabilities, or the
        prediction as one column)."""
        import numpy as np

        probe = self.background[:2]
        if self.classes is not None and hasattr(self.model, "predict_proba"):
            self.output_kind = "probability"
            return lambda matrix: np.asarray(self.model.predict_proba(self._frame(matrix)), dtype=np.float64)
        try:
            sample = np.asarray(self._predict(probe))
        except Exception as exc:
            raise NoExplainer(f"the model failed on reference rows: {_error_text(exc)[:300]}") from None
        if sample.dtype.kind not in "fiub" or sample.reshape(len(probe), -1).shape[1] != 1:
            raise NoExplainer("the model answers labels or several values per row and no probabilities, so "
                              "there is no one number per row to explain")
        self.output_kind = "prediction"
        return lambda matrix: np.asarray(self._predict(matrix), dtype=np.float64).reshape(len(matrix), 1)

    def _predict(self, matrix: Any) -> Any:
        import numpy as np
        import pandas as pd

        result = self.model.predict(self._frame(matrix))
        if isinstance(result, (pd.DataFrame, pd.Series)):
            result = result.to_numpy()
        return np.asarray(result)

    def _raw_output(self, matrix: Any) -> tuple[Any, str]:
        """The model's own output in the space its explainer explains: (rows x outputs, what it is)."""
        import numpy as np

        model, frame, module = self.model, self._frame(matrix), type(self.model).__module__
        margin = "margin (log-odds)" if self.classes is not None else "prediction (raw score)"
        if module.startswith("xgboost"):
            return np.asarray(model.predict(frame, output_margin=True), dtype=np.float64), margin
        if module.startswith("lightgbm"):
            return np.asarray(model.predict(frame, raw_score=True), dtype=np.float64), margin
        if self.classes is not None and self.family == "linear":
            return np.asarray(model.decision_function(frame), dtype=np.float64), "decision function (log-odds)"
        if self.classes is not None and module.startswith("sklearn.ensemble._gb"):
            return np.asarray(model.decision_function(frame), dtype=np.float64), "margin (log-odds)"
        if self.classes is not None and hasattr(model, "predict_proba"):
            return np.asarray(model.predict_proba(frame), dtype=np.float64), "probability"
        return np.asarray(self._predict(matrix), dtype=np.float64), "prediction"

    # --- explaining --------------------------------------------------------------------------------------------

    def _per_class(self, values: Any, expected: Any, outputs: Any, n: int, width: int) -> tuple[Any, Any, Any, Any]:
        """(attributions rows x features, base per row, output per row, class index per row or None)."""
        import numpy as np

        values = np.asarray(values, dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64).reshape(-1)
        outputs = outputs.reshape(n, -1)
        if values.ndim == 2:  # one output explained (a regressor, or a binary margin)
            column = outputs[:, -1] if outputs.shape[1] > 1 else outputs[:, 0]
            return values, np.full(n, expected[-1]), column, (None if self.classes is None else
                                                              np.full(n, len(self.classes) - 1))
        classes = values.shape[2]
        if self.classes is not None and len(self.classes) == 2 and classes == 2:
            picked = np.ones(n, dtype=int)
        else:
            picked = np.argmax(outputs, axis=1) if outputs.shape[1] == classes else np.zeros(n, dtype=int)
        rows = np.arange(n)
        return values[rows, :, picked], expected[picked], outputs[rows, picked], picked

    def explain(self, matrix: Any, deadline: float | None = None) -> dict[str, Any]:
        import numpy as np

        matrix = np.asarray(matrix, dtype=np.float64)
        n, width = matrix.shape
        started = time.perf_counter()
        evaluations = 0
        exact = self._exact_xgboost(matrix) if self.family == "tree" and self.exact is not None else None
        if exact is not None:
            attributions, base, output, picked, kind = exact
        elif self.family == "tree":
            values = self.explainer.shap_values(self._frame(matrix), check_additivity=False)
            outputs, kind = self._raw_output(matrix)
            if isinstance(values, list):  # older per-class lists
                values = np.stack(values, axis=-1)
            attributions, base, output, picked = self._per_class(values, self.explainer.expected_value, outputs,
                                                                 n, width)
        elif self.family == "linear":
            values = self.explainer.shap_values(matrix)
            outputs, kind = self._raw_output(matrix)
            if isinstance(values, list):
                values = np.stack(values, axis=-1)
            attributions, base, output, picked = self._per_class(values, self.explainer.expected_value, outputs,
                                                                 n, width)
        else:
            attributions, base, output, picked, evaluations = self._agnostic(matrix, deadline)
            kind = self.output_kind
        return {"attributions": attributions, "base": base, "output": output, "picked": picked, "kind": kind,
                "seconds": time.perf_counter() - started, "evaluations": evaluations}

    def _exact_xgboost(self, matrix: Any) -> tuple[Any, Any, Any, Any, str] | None:
        """XGBoost's trees explained by shap's double-precision TreeSHAP (``_xgboost_exact``), and the margin those
        trees give in double precision. Proven on every request before it is used: that margin must be XGBoost's
        own (``predict(output_margin=True)``, a float32 sum) within the float32 rounding of summing its trees
        (``bound``). Otherwise (a model shap parses differently from XGBoost) None: XGBoost's own float32
        contributions are used, as ``shap.TreeExplainer`` gives them."""
        import numpy as np

        assert self.exact is not None
        explainer, bound = self.exact
        rows = np.asarray(matrix, dtype=np.float32)  # as XGBoost reads them (its DMatrix is float32)
        margin = np.asarray(explainer.model.predict(rows), dtype=np.float64).reshape(-1)
        theirs, kind = self._raw_output(matrix)
        theirs = np.asarray(theirs, dtype=np.float64).reshape(-1)
        if theirs.shape != margin.shape or not np.all(np.abs(margin - theirs) <= bound):
            self.exact = None
            return None
        values = np.asarray(explainer.shap_values(rows, check_additivity=False), dtype=np.float64)
        base = np.full(len(margin), float(np.asarray(explainer.expected_value, dtype=np.float64).reshape(-1)[0]))
        picked = None if self.classes is None else np.full(len(margin), len(self.classes) - 1)
        return values.reshape(len(margin), -1), base, margin, picked, kind

    def _agnostic(self, matrix: Any, deadline: float | None) -> tuple[Any, Any, Any, Any, int]:
        """Kernel SHAP (``shap.KernelExplainer``, no L1 selection: the attributions add up exactly) row by row,
        sized to the budget: coalition samples per row between 2 x features + 2 and 2,048, fewer background rows
        (an even sample) when even the fewest samples would not fit; past the budget it stops and says so
        (``ExplainBudget``). Approximate: the Shapley values are estimated from sampled coalitions."""
        import numpy as np

        n, width = matrix.shape
        budget_end = time.perf_counter() + self.budget
        if deadline is not None:
            budget_end = min(budget_end, deadline)
        background = self.background
        # What one model call on a background-sized batch costs: the unit of the budget.
        # Timed warm (the better of two calls): a model's first call pays its lazy set-up, and a cold first call
        # once priced a 30-feature pipeline past the whole budget, so that no row at all was explained.
        batch = np.repeat(matrix[:1], len(background), axis=0)
        per_call = float("inf")
        for _ in range(2):
            timer = time.perf_counter()
            self._function(batch)
            per_call = min(per_call, max(time.perf_counter() - timer, 1e-5))
        fewest = 2 * width + 2
        per_row_seconds = (budget_end - time.perf_counter()) / n * 0.8  # a fifth kept for the overhead
        if per_call * fewest > per_row_seconds and len(background) > 1:
            keep = max(1, int(len(background) * per_row_seconds / (per_call * fewest)))
            background = background[np.linspace(0, len(background) - 1, keep).astype(int)]
            per_call *= keep / len(self.background)
        if per_call * fewest > per_row_seconds:
            needed = per_call * fewest * n / 0.8
            raise ExplainBudget(f"explaining {n} rows model-agnostically needs about {needed:.1f} s, over the "
                                f"budget of {self.budget:.1f} s: send fewer rows")
        # A power of two, and the sampler seeded by the row itself: the same row explained twice (the subject access
        # page, then its download) gets the same estimate unless the machine's speed moved the budget's choice.
        samples = 1 << int(np.log2(max(fewest, min(2048, per_row_seconds / per_call))))
        samples = max(samples, fewest)
        explainer = self._shap.KernelExplainer(self._function, background)
        expected = np.asarray(explainer.expected_value, dtype=np.float64).reshape(-1)
        attributions = np.empty((n, width))
        base = np.empty(n)
        output = np.empty(n)
        picked = None if self.classes is None else np.empty(n, dtype=int)
        for i in range(n):
            if time.perf_counter() > budget_end:
                raise ExplainBudget(f"explained {i} of {n} rows within the budget of {self.budget:.1f} s: "
                                    "send fewer rows")
            np.random.seed(int.from_bytes(hashlib.blake2b(np.ascontiguousarray(matrix[i]).tobytes(),
                                                          digest_size=4).digest(), "big"))
            values = np.asarray(explainer.shap_values(matrix[i:i + 1], nsamples=samples, silent=True,
                                                      l1_reg=False), dtype=np.float64).reshape(width, -1)
            outputs = self._function(matrix[i:i + 1]).reshape(-1)
            k = 0
            if picked is not None and self.classes is not None:
                k = 1 if len(self.classes) == 2 and len(outputs) == 2 else int(np.argmax(outputs))
                picked[i] = k
            attributions[i], base[i], output[i] = values[:, k], expected[k], outputs[k]
        self.background_used = len(background)
        return attributions, base, output, picked, samples * len(background) * n

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "approximate": self.approximate, "family": self.family}


def explain_rows(explainer: Explainer, matrix: Any, columns: list[str], deadline: float | None) -> dict[str, Any]:
    """The answer of an explain request: per row the output explained, its base value and attributions."""
    import numpy as np

    found = explainer.explain(matrix, deadline)
    attributions, base, output = found["attributions"], found["base"], found["output"]
    gap = float(np.max(np.abs(attributions.sum(axis=1) + base - output))) if len(output) else 0.0
    classes = explainer.classes
    picked = found["picked"]
    rows = []
    for i in range(len(output)):
        row: dict[str, Any] = {"output": float(output[i]), "base_value": float(base[i]),
                               "attributions": [float(v) for v in attributions[i]]}
        if classes is not None and picked is not None:
            row["class"] = classes[int(picked[i])]
        rows.append(row)
    description = explainer.describe()
    cost: dict[str, Any] = {"seconds": round(found["seconds"], 6), "rows": len(output)}
    if found["evaluations"]:
        cost["model_evaluations"] = int(found["evaluations"])
        cost["background_rows"] = int(getattr(explainer, "background_used", 0))
    return {"ok": True, **description, "output": found["kind"], "columns": columns, "rows": rows,
            "additivity_gap": gap, "cost": cost}


def global_importance(fmt: str, path: str, options: dict[str, Any]) -> dict[str, Any]:
    """A version's global importance, at scan time: mean |SHAP| per feature over (a sample of) the reference rows,
    with the method, what it cost, and a background sample for the explain endpoint."""
    import numpy as np

    root = path if os.path.isdir(path) else os.path.dirname(path)
    if fmt != "mlflow" and os.path.isdir(path):
        path = os.path.join(path, f"model.{fmt}")
    columns = options.get("columns") or None
    reference = np.load(os.path.join(root, options["reference"]), allow_pickle=False)
    budget = float(options.get("budget_seconds") or 30)
    reference = reference[np.isfinite(reference).all(axis=1)]
    if not len(reference):
        return {"ok": False, "error": "the reference data has no complete rows to explain"}
    rng = np.random.default_rng(0)
    background = reference[np.sort(rng.choice(len(reference), size=min(EXPLAIN_BACKGROUND_ROWS, len(reference)),
                                              replace=False))]
    model = _load_for_serving(fmt, path, options) if fmt == "onnx" else _load(fmt, path, options)
    started = time.perf_counter()
    try:
        explainer = Explainer(model, columns, background, budget=budget)
    except NoExplainer as exc:
        return {"ok": False, "error": str(exc), "no_explainer": True}
    sample = reference[np.sort(rng.choice(len(reference), size=min(GLOBAL_MAX_ROWS, len(reference)),
                                          replace=False))]
    if explainer.family == "agnostic":  # sampled coalitions over a smaller background, on fewer rows
        sample = sample[:GLOBAL_AGNOSTIC_ROWS]
        explainer.background = background[np.linspace(0, len(background) - 1,
                                                      min(len(background), GLOBAL_AGNOSTIC_BACKGROUND)).astype(int)]
        explainer.budget = min(budget, GLOBAL_AGNOSTIC_SECONDS)
    totals = np.zeros(sample.shape[1])
    explained = 0
    evaluations = 0
    note = ""
    chunk = 100 if explainer.family != "agnostic" else len(sample)
    end = started + budget
    while explained < len(sample):
        if time.perf_counter() > end:
            note = f"the budget of {budget:.0f} s ran out after {explained} rows"
            break
        part = sample[explained:explained + chunk]
        try:
            found = explainer.explain(part, end)
        except ExplainBudget:
            note = f"the budget of {budget:.0f} s ran out after {explained} rows"
            break
        totals += np.abs(found["attributions"]).sum(axis=0)
        evaluations += found["evaluations"]
        explained += len(part)
    if not explained:
        return {"ok": False, "error": f"not one reference row could be explained within {budget:.0f} s"}
    mean_abs = totals / explained
    share = mean_abs / mean_abs.sum() if mean_abs.sum() > 0 else mean_abs
    names = columns or [f"f{i}" for i in range(sample.shape[1])]
    cost: dict[str, Any] = {"seconds": round(time.perf_counter() - started, 3), "rows": explained,
                            "reference_rows": len(reference)}
    if evaluations:
        cost["model_evaluations"] = int(evaluations)
        cost["background_rows"] = int(getattr(explainer, "background_used", len(background)))
    return {"ok": True, **explainer.describe(), "output": getattr(explainer, "output_kind", "")
            or _output_words(explainer), "features": [
                {"name": str(n), "mean_abs": float(m), "share": float(s)}
                for n, m, s in zip(names, mean_abs, share, strict=True)],
            "cost": cost, "note": note, "background": background.tolist(), "columns": names}


def _output_words(explainer: Explainer) -> str:
    try:
        return explainer._raw_output(explainer.background[:1])[1]
    except Exception:
        return ""


def _host_explain(model: Any, header: dict[str, Any], payload: bytes,
                  explainers: dict[str, Explainer | NoExplainer], by_matrix: Any) -> dict[str, Any]:
    """An explain request: the rows, then the background rows, as float64 matrices in one payload. The explainer
    is built once per background (and its refusal remembered)."""
    import hashlib

    import numpy as np

    shape, background_shape = header["shape"], header.get("background_shape") or [0, 0]
    rows = int(shape[0]) * int(shape[1])
    data = np.frombuffer(payload, dtype="float64")
    matrix = data[:rows].reshape(shape)
    if int(shape[0]) > EXPLAIN_MAX_ROWS:
        return {"ok": False, "error": f"at most {EXPLAIN_MAX_ROWS} rows may be explained at once"}
    background = data[rows:].reshape(background_shape) if background_shape[0] else None
    columns = header.get("columns") or None
    key = hashlib.sha256(payload[rows * 8:]).hexdigest() + json.dumps(columns)
    explainer = explainers.get(key)
    if explainer is None:
        try:
            explainer = Explainer(model, columns, background, budget=float(header.get("budget_seconds") or 5))
        except NoExplainer as exc:
            explainer = exc
        explainers.clear()  # one background at a time: a new one replaces the old
        explainers[key] = explainer
    if isinstance(explainer, NoExplainer):
        return {"ok": False, "no_explainer": True, "error": str(explainer)}
    explainer.budget = float(header.get("budget_seconds") or explainer.budget)
    deadline = time.perf_counter() + float(header.get("budget_seconds") or 5)
    try:
        answer = explain_rows(explainer, matrix, columns or [f"f{i}" for i in range(matrix.shape[1])], deadline)
    except ExplainBudget as exc:
        return {"ok": False, "over_budget": True, "error": str(exc)}
    answer["predictions"] = [p.item() if hasattr(p, "item") else p for p in by_matrix(matrix, columns)]
    return answer


def host(fmt: str, path: str, options: dict[str, Any]) -> int:
    """Load once, then answer predict frames until the parent closes the socket."""
    import numpy as np
    import orjson

    # The socket is kept on private descriptors; 0 and 1 are pointed away so that a model that prints (or reads)
    # cannot break the framing by accident.
    reader = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    writer = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    started = time.perf_counter()
    try:
        model = _load_for_serving(fmt, path, options)
    except MemoryError:
        write_frame(writer, orjson.dumps({"ok": False, "error": "the model needed more memory than the sandbox allows"}))
        return 0
    except Exception as exc:
        write_frame(writer, orjson.dumps({"ok": False, "error": _error_text(exc)}))
        return 0
    by_matrix = _MatrixPredictor(model)
    by_frame = _FrameScorer(model) if fmt == "mlflow" else None
    explainers: dict[str, Explainer | NoExplainer] = {}
    write_frame(writer, orjson.dumps({"ok": True, "ready": True,
                                      "load_seconds": round(time.perf_counter() - started, 4)}))
    while True:
        try:
            (size,) = FRAME_HEADER.unpack(read_exact(reader, FRAME_HEADER.size))
            header = orjson.loads(read_exact(reader, size))
            payload = read_exact(reader, int(header.get("nbytes") or 0))
        except EOFError:
            return 0
        try:
            if header.get("op") == "ping":
                answer: dict[str, Any] = {"ok": True}
            elif header.get("op") == "invoke":
                answer = _invoke(model, payload, str(header.get("content_type") or ""))
            elif header.get("op") == "frame":
                if by_frame is None:
                    answer = {"ok": False, "decline": "not an MLflow model", "permanent": True}
                else:
                    matrix = np.frombuffer(payload, dtype="float64").reshape(header["shape"])
                    answer = by_frame(matrix, header.get("columns") or None, header.get("kinds") or None)
            elif header.get("op") == "explain":
                answer = _host_explain(model, header, payload, explainers, by_matrix)
            else:
                matrix = np.frombuffer(payload, dtype="float64").reshape(header["shape"])
                answer = {"ok": True, "predictions": by_matrix(matrix, header.get("columns") or None).tolist()}
            body = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY, default=_json_default)
        except MemoryError:
            body = orjson.dumps({"ok": False, "error": "the model needed more memory than the sandbox allows"})
        except Exception as exc:
            body = orjson.dumps({"ok": False, "error": _error_text(exc)})
        write_frame(writer, body)


def main(argv: list[str]) -> int:
    not_dumpable()
    if len(argv) > 1 and argv[1] == "probe":
        _emit({"ok": True})
        return 0
    if len(argv) > 2 and argv[1] == "--limits":
        set_limits(argv[2])
        argv = [argv[0], *argv[3:]]
    if argv[1] == "host":
        return host(argv[2], argv[3], json.loads(argv[4]))
    try:
        if argv[1] == "inspect-onnx":
            _emit(inspect_onnx(argv[2]))
        elif argv[1] == "prepare-serving":
            _emit(prepare_serving(argv[2], argv[3], json.loads(argv[4])))
        elif argv[1] == "skops-types":
            _emit(skops_types(argv[2]))
        elif argv[1] == "importance":
            _emit(global_importance(argv[2], argv[3], json.loads(argv[4])))
        elif argv[1] == "smoke":
            _emit(smoke(argv[2], argv[3], json.loads(argv[4]) if len(argv) > 4 else {}))
        else:
            _emit({"ok": False, "error": f"unknown mode {argv[1]}"})
    except MemoryError:
        _emit({"ok": False, "error": "the model needed more memory than the sandbox allows"})
    except Exception as exc:
        _emit({"ok": False, "error": _error_text(exc)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
