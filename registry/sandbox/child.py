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
``nbytes``, that many raw bytes (a C-ordered float64 matrix of ``shape``). Answers are frames with a JSON header
only. The limits are set before anything reads the artifact, and cannot be raised again from inside.
"""

from __future__ import annotations

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


def set_limits(spec: str) -> None:
    """Address space (bytes), CPU seconds (0: none, for long-lived hosts), file size (bytes), open files."""
    address_space, cpu, file_size, files = (int(x) for x in spec.split(","))
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    if cpu:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


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

        model = mlflow.pyfunc.load_model(path)
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
    if columns is None:
        columns = feature_names or ([f"f{i}" for i in range(n_features)] if n_features else None)
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

        model = mlflow.pyfunc.load_model(path)
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


def prepare_serving(fmt: str, path: str, options: dict[str, Any]) -> dict[str, Any]:
    """Convert a vetted model to ONNX for the web workers, and keep the conversion only if it predicts exactly what
    the model itself predicts on the example rows. ONNX loading runs no Python code from the file."""
    import numpy as np

    columns = options["columns"]
    try:
        rows = np.asarray(options["rows"], dtype="float64")
    except (TypeError, ValueError):
        return {"ok": True, "kind": "native", "reason": "not every input is a number, and the in-process ONNX "
                                                        "form takes one numeric matrix"}
    model = _load(fmt, path, options)
    if not _is_estimator(model):
        return {"ok": True, "kind": "native", "reason": "not a scikit-learn estimator, which the ONNX converter needs"}
    # A tensor signature has no column names: the model takes the matrix itself.
    frame = _frame({"columns": columns, "data": rows.tolist()}, columns) if columns else rows
    native = np.asarray(model.predict(frame))
    try:
        from skl2onnx import to_onnx
        from sklearn.pipeline import Pipeline

        final = model.steps[-1][1] if isinstance(model, Pipeline) else model
        conversion_options = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else None
        import onnxruntime

        onnx_model = session = None
        for dtype in ("float64", "float32"):
            # A graph skl2onnx writes may still be one onnxruntime cannot run (a double-precision tree ensemble
            # on some releases): only a graph that loads counts as converted.
            try:
                onnx_model = to_onnx(model, rows[:1].astype(dtype), options=conversion_options, target_opset=17)
                session = onnxruntime.InferenceSession(onnx_model.SerializeToString(),
                                                       providers=["CPUExecutionProvider"])
                break
            except Exception:
                onnx_model = session = None
                continue
        if onnx_model is None or session is None:
            return {"ok": True, "kind": "native", "reason": "no ONNX converter for this model"}
        first = session.get_inputs()[0]
        feed_dtype = np.float32 if first.type == "tensor(float)" else np.float64
        onnx_pred = np.asarray(session.run(None, {first.name: rows.astype(feed_dtype)})[0]).ravel()
        if onnx_pred.shape != native.ravel().shape or not np.array_equal(onnx_pred, native.ravel()):
            if native.dtype.kind == "f" and np.allclose(onnx_pred, native.ravel(), rtol=1e-6, atol=1e-9):
                pass
            else:
                return {"ok": True, "kind": "native", "reason": "the ONNX conversion predicts differently"}
        with open(options["output"], "wb") as out:
            out.write(onnx_model.SerializeToString())
        return {"ok": True, "kind": "onnx", "input_dtype": "float32" if feed_dtype is np.float32 else "float64",
                "outputs": [o.name for o in session.get_outputs()]}
    except ImportError:
        return {"ok": True, "kind": "native", "reason": "skl2onnx is not installed"}


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

        return mlflow.pyfunc.load_model(path)
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


class _MatrixPredictor:
    """Predictions for a float64 matrix, as cheaply as gives the same answers: the estimator itself rather than
    pyfunc's wrapper (the portal has checked the columns), and the bare array rather than a DataFrame once the first
    request showed both answer alike (a ColumnTransformer that picks columns by name needs the DataFrame)."""

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
            else:
                matrix = np.frombuffer(payload, dtype="float64").reshape(header["shape"])
                answer = {"ok": True, "predictions": by_matrix(matrix, header.get("columns") or None).tolist()}
            body = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
        except MemoryError:
            body = orjson.dumps({"ok": False, "error": "the model needed more memory than the sandbox allows"})
        except Exception as exc:
            body = orjson.dumps({"ok": False, "error": _error_text(exc)})
        write_frame(writer, body)


def main(argv: list[str]) -> int:
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
