"""Builders for model files, good and hostile. Hostile payloads all try to create CANARY; tests check it never appears."""

from __future__ import annotations

import io
import os
import pickle
import stat
import struct
import zipfile
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

CANARY = Path(os.environ.get("PORTAL_TEST_CANARY", "/tmp/portal-test-canary"))


@cache
def _data() -> tuple[object, object]:
    from sklearn.datasets import load_breast_cancer

    return load_breast_cancer(return_X_y=True, as_frame=True)


@cache
def logistic_regression() -> object:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _data()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)


def skops_file(dest: Path) -> Path:
    import skops.io

    skops.io.dump(logistic_regression(), dest)
    return dest


def forest_skops_file(dest: Path) -> Path:
    import skops.io
    from sklearn.ensemble import RandomForestClassifier

    X, y = _data()
    skops.io.dump(RandomForestClassifier(n_estimators=3, random_state=1).fit(X, y), dest)
    return dest


def joblib_file(dest: Path, obj: object = None, compress: int = 0) -> Path:
    import joblib

    joblib.dump(obj if obj is not None else logistic_regression(), dest, compress=compress)
    return dest


def pickle_file(dest: Path, obj: object = None, protocol: int = 5) -> Path:
    dest.write_bytes(pickle.dumps(obj if obj is not None else logistic_regression(), protocol=protocol))
    return dest


def reference_csv(dest: Path, rows: int = 200) -> Path:
    X, y = _data()
    frame = X.head(rows).copy()
    frame["target"] = y.head(rows)
    frame.to_csv(dest, index=False)
    return dest


def mlflow_zip(dest_dir: Path, *, n_estimators: int = 5) -> Path:
    from registry.demo import build_random_forest_mlflow

    path, _metrics = build_random_forest_mlflow(dest_dir, n_estimators=n_estimators)
    return path


def onnx_file(dest: Path) -> Path:
    from skl2onnx import to_onnx

    X, _y = _data()
    model = to_onnx(logistic_regression(), X.to_numpy()[:1].astype(np.float32), target_opset=17)
    dest.write_bytes(model.SerializeToString())
    return dest


def onnx_with_external_data(dest: Path, location: str) -> Path:
    from onnx import TensorProto, helper

    tensor = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    dest.write_bytes(model.SerializeToString())
    return dest


# --- Hostile pickles -------------------------------------------------------------------------------------------

TOUCH = f"touch {CANARY}"
WRITE = f"open({str(CANARY)!r}, 'w').write('pwned')"


class _Reduce:
    def __init__(self, func: object, args: tuple[object, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def pickle_os_system_protocol0() -> bytes:
    return f"cos\nsystem\n(S'{TOUCH}'\ntR.".encode()


def pickle_builtins_eval() -> bytes:
    return pickle.dumps(_Reduce(eval, (WRITE,)), protocol=2)


def pickle_stack_global_via_memo() -> bytes:
    """builtins.exec assembled through MEMOIZE and BINGET, the way scanner bypasses hide it."""
    def unicode(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()
    body = (b"\x80\x04" + unicode("builtins") + b"\x94" + unicode("exec") + b"\x94" + b"0" + b"0"
            + b"h\x00" + b"h\x01" + b"\x93" + unicode(WRITE) + b"\x85" + b"R" + b".")
    return body


def pickle_stack_global_computed() -> bytes:
    """The module name comes out of a call, so no static scanner can know it."""
    def unicode(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()
    return (b"\x80\x04" + b"cbuiltins\nstr\n" + unicode("os") + b"\x85" + b"R" + unicode("system") + b"\x93"
            + unicode(TOUCH) + b"\x85" + b"R" + b".")


def pickle_pkgutil_resolve_name() -> bytes:
    import pkgutil

    return pickle.dumps(_Reduce(pkgutil.resolve_name, ("os:system",)), protocol=4)


def pickle_sklearn_function() -> bytes:
    from sklearn.datasets import fetch_openml

    return pickle.dumps(_Reduce(fetch_openml, ("mnist_784",)), protocol=4)


def pickle_persistent_id() -> bytes:
    return b"\x80\x02P0\n."


def pickle_extension_registry() -> bytes:
    return b"\x80\x02\x82\x01."


def joblib_with_nested_evil(dest: Path) -> Path:
    import joblib

    arr = np.empty(1, dtype=object)
    arr[0] = _Reduce(os.system, (TOUCH,))
    joblib.dump({"model": logistic_regression(), "extra": arr}, dest)
    return dest


def compressed_joblib_with_evil(dest: Path) -> Path:
    dest.write_bytes(zlib.compress(pickle.dumps(_Reduce(os.system, (TOUCH,)), protocol=2)))
    return dest


# --- Hostile archives -------------------------------------------------------------------------------------------

def zip_with(dest: Path, members: list[tuple[str, bytes]], *, mode: int | None = None) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            archive.writestr(info, data)
    return dest


def zip_symlink(dest: Path) -> Path:
    return zip_with(dest, [("MLmodel", b"/etc/passwd")], mode=stat.S_IFLNK | 0o777)


def zip_device(dest: Path) -> Path:
    return zip_with(dest, [("MLmodel", b"")], mode=stat.S_IFCHR | 0o666)


def zip_bomb(dest: Path, megabytes: int = 60) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("MLmodel", "w") as member:
            chunk = b"\x00" * (1024 * 1024)
            for _ in range(megabytes):
                member.write(chunk)
    return dest


def zip_lying_header(dest: Path) -> Path:
    """A member whose header claims 10 bytes but which inflates to 5 MB."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("MLmodel", b"flavors: {}\n" + b" " * (5 * 1024 * 1024))
    data = bytearray(buf.getvalue())
    # Patch the uncompressed size in the local header (offset 22) and the central directory (offset 24).
    struct.pack_into("<I", data, 22, 10)
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 10)
    dest.write_bytes(bytes(data))
    return dest


def zip_encrypted_flag(dest: Path) -> Path:
    zip_with(dest, [("MLmodel", b"flavors: {}\n")])
    data = bytearray(dest.read_bytes())
    struct.pack_into("<H", data, 6, 1)
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<H", data, central + 8, 1)
    dest.write_bytes(bytes(data))
    return dest


def mlflow_zip_with_member(dest: Path, source_zip: Path, name: str, data: bytes, *, replace: str | None = None) -> Path:
    """Copy an MLflow model zip, adding (or replacing) one member."""
    with zipfile.ZipFile(source_zip) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if replace and info.filename == replace:
                continue
            out.writestr(info, src.read(info))
        out.writestr(name, data)
    return dest


def docs_idiom_pipeline(tmp_path: Path) -> tuple[Path, Any, Any]:
    """MLflow's documentation idiom: a Pipeline over string and numeric columns, saved with
    ``signature=infer_signature(X, model.predict(X))`` and an input example, zipped as an upload."""
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(7)
    X = pd.DataFrame({"plan": rng.choice(["basic", "premium", "gold"], 300), "age": rng.integers(18, 80, 300),
                      "spend": rng.random(300) * 100})
    y = ((X.plan == "premium") | (X.spend > 60)).astype(int)
    pipe = Pipeline([("prep", ColumnTransformer([("onehot", OneHotEncoder(handle_unknown="ignore"), ["plan"]),
                                                 ("scale", StandardScaler(), ["age", "spend"])])),
                     ("clf", LogisticRegression())]).fit(X, y)
    folder = tmp_path / "model"
    mlflow.sklearn.save_model(pipe, str(folder), signature=infer_signature(X, pipe.predict(X)),
                              input_example=X.head(3))
    archive = tmp_path / "plans.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.rglob("*"):
            zf.write(path, Path("model") / path.relative_to(folder))
    return archive, pipe, X
