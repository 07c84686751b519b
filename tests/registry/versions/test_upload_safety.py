"""Every hostile upload is refused with a 4xx a person can act on; nothing is stored and nothing runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings

from portal.models import AuditEvent
from registry.models import Blob, ModelVersion, RegisteredModel
from registry.versions import services
from tests.conftest import assert_error_shape
from tests.registry import files

pytestmark = pytest.mark.django_db


@pytest.fixture
def model(personas: dict[str, Any]) -> RegisteredModel:
    from portal.models import Team

    return services.model_register(name="churn", team=Team.objects.get(slug="acme"), actor=personas["ds"])


@pytest.fixture(autouse=True)
def no_canary() -> Any:
    files.CANARY.unlink(missing_ok=True)
    yield
    assert not files.CANARY.exists(), "a payload ran: the canary file was created"


def _upload(client: Any, name: str, data: bytes, **fields: Any) -> Any:
    return client.post("/api/v1/models/churn/versions/", {"file": SimpleUploadedFile(name, data), **fields},
                       format="multipart")


def _artifact_files() -> list[Path]:
    from django.conf import settings

    root = Path(settings.VAR_DIR) / "artifacts"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _in_tmp(tmp_path: Path, name: str, builder: Callable[[Path], Path]) -> bytes:
    return builder(tmp_path / name).read_bytes()


HOSTILE: dict[str, tuple[str, Callable[[Path], bytes], str]] = {
    # name: (file name, builder, words the message must contain)
    "corrupt zip": ("model.zip", lambda t: b"PK\x03\x04" + b"\x00garbage" * 20, "corrupt"),
    "truncated zip": ("model.zip", lambda t: _in_tmp(t, "z.zip", lambda p: files.zip_with(
        p, [("MLmodel", b"flavors: {}\n" * 100)]))[:60], "corrupt"),
    "zip bomb": ("model.zip", lambda t: _in_tmp(t, "bomb.zip", files.zip_bomb), "zip bomb"),
    "zip with a lying header": ("model.zip", lambda t: _in_tmp(t, "lie.zip", files.zip_lying_header),
                                "cannot be unpacked"),
    "zip slip ../": ("model.zip", lambda t: _in_tmp(t, "s.zip", lambda p: files.zip_with(
        p, [("../../evil.py", b"x")])), "climbs out"),
    "zip slip nested ../": ("model.zip", lambda t: _in_tmp(t, "s.zip", lambda p: files.zip_with(
        p, [("model/../../evil", b"x")])), "climbs out"),
    "zip absolute path": ("model.zip", lambda t: _in_tmp(t, "a.zip", lambda p: files.zip_with(
        p, [("/etc/cron.d/evil", b"x")])), "absolute path"),
    "zip drive letter": ("model.zip", lambda t: _in_tmp(t, "d.zip", lambda p: files.zip_with(
        p, [("C:/Windows/evil", b"x")])), "absolute path"),
    "zip backslash traversal": ("model.zip", lambda t: _in_tmp(t, "b.zip", lambda p: files.zip_with(
        p, [("..\\..\\evil", b"x")])), "backslash"),
    "zip symlink": ("model.zip", lambda t: _in_tmp(t, "l.zip", files.zip_symlink), "symbolic link"),
    "zip device file": ("model.zip", lambda t: _in_tmp(t, "c.zip", files.zip_device), "device"),
    "zip encrypted": ("model.zip", lambda t: _in_tmp(t, "e.zip", files.zip_encrypted_flag), "encrypted"),
    "zip without a model": ("model.zip", lambda t: _in_tmp(t, "n.zip", lambda p: files.zip_with(
        p, [("README.txt", b"hello")])), "MLmodel"),
    "pickle disguised as onnx": ("model.onnx", lambda t: files.pickle_os_system_protocol0(), "content is pickle"),
    "pickle disguised as skops": ("model.skops", lambda t: files.pickle_builtins_eval(), "content is pickle"),
    "os.system, protocol 0": ("model.pkl", lambda t: files.pickle_os_system_protocol0(), "os.system"),
    "builtins.eval via REDUCE": ("model.pkl", lambda t: files.pickle_builtins_eval(), "builtins.eval"),
    "STACK_GLOBAL through the memo": ("model.pkl", lambda t: files.pickle_stack_global_via_memo(), "builtins.exec"),
    "STACK_GLOBAL from a computed name": ("model.pkl", lambda t: files.pickle_stack_global_computed(), "STACK_GLOBAL"),
    "pkgutil.resolve_name": ("model.pkl", lambda t: files.pickle_pkgutil_resolve_name(), "pkgutil.resolve_name"),
    "a scikit-learn function": ("model.pkl", lambda t: files.pickle_sklearn_function(), "functions are never allowed"),
    "persistent ids": ("model.pkl", lambda t: files.pickle_persistent_id(), "persistent ids"),
    "extension registry": ("model.pkl", lambda t: files.pickle_extension_registry(), "extension registry"),
    "pickle nested in a joblib array": ("model.joblib", lambda t: _in_tmp(t, "n.joblib", files.joblib_with_nested_evil),
                                        "posix.system"),
    "compressed joblib": ("model.joblib", lambda t: _in_tmp(t, "c.joblib", files.compressed_joblib_with_evil),
                          "posix.system"),
    "malicious pickle with an unknown extension": ("model.bin", lambda t: files.pickle_builtins_eval(),
                                                   "builtins.eval"),
    "standalone ONNX with external data": ("model.onnx", lambda t: _in_tmp(
        t, "x.onnx", lambda p: files.onnx_with_external_data(p, "weights.bin")), "another file"),
    "empty file": ("model.pkl", lambda t: b"", "empty"),
    "a text file": ("notes.txt", lambda t: b"just some notes\n", "not a model file"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_uploads_are_refused_and_leave_nothing(case: str, personas: dict[str, Any], model: RegisteredModel,
                                                      api_as: Any, tmp_path: Path) -> None:
    filename, builder, expected = HOSTILE[case]
    stored_before = _artifact_files()
    response = _upload(api_as(personas["ds"]), filename, builder(tmp_path))
    assert 400 <= response.status_code < 500
    body = assert_error_shape(response, response.status_code)
    assert expected.lower() in str(body).lower(), body
    assert not ModelVersion.objects.exists() and not Blob.objects.exists()
    assert _artifact_files() == stored_before
    if response.status_code == 422:
        event = AuditEvent.objects.get(action="version.upload_rejected")
        assert event.outcome == "failure" and event.metadata["findings"]


def test_an_evil_pickle_inside_an_mlflow_zip_is_named(personas: dict[str, Any], model: RegisteredModel, api_as: Any,
                                                      tmp_path: Path) -> None:
    good = files.mlflow_zip(tmp_path)
    bad = files.mlflow_zip_with_member(tmp_path / "bad.zip", good, "extra/helper.pkl", files.pickle_builtins_eval())
    body = assert_error_shape(_upload(api_as(personas["ds"]), "model.zip", bad.read_bytes()), 422, "upload_rejected")
    assert body["error"]["details"]["findings"][0]["member"] == "extra/helper.pkl"
    assert "builtins.eval" in body["error"]["message"]


def test_code_inside_an_mlflow_zip_is_refused(personas: dict[str, Any], model: RegisteredModel, api_as: Any,
                                              tmp_path: Path) -> None:
    good = files.mlflow_zip(tmp_path)
    bad = files.mlflow_zip_with_member(tmp_path / "bad.zip", good, "code/loader.py", b"import os\n")
    body = assert_error_shape(_upload(api_as(personas["ds"]), "model.zip", bad.read_bytes()), 422)
    assert "not code" in body["error"]["message"]


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "missing.bin"])
def test_onnx_external_data_stays_inside_the_archive(location: str, personas: dict[str, Any],
                                                     model: RegisteredModel, api_as: Any, tmp_path: Path) -> None:
    good = files.mlflow_zip(tmp_path)
    onnx_bytes = files.onnx_with_external_data(tmp_path / "m.onnx", location).read_bytes()
    bad = files.mlflow_zip_with_member(tmp_path / "bad.zip", good, "model.onnx", onnx_bytes)
    body = assert_error_shape(_upload(api_as(personas["ds"]), "model.zip", bad.read_bytes()), 422)
    assert "tensor 'w'" in body["error"]["message"]


@override_settings(PORTAL_MAX_UPLOAD_BYTES=4096)
def test_an_oversize_upload_is_413_with_the_limit(personas: dict[str, Any], model: RegisteredModel,
                                                   api_as: Any) -> None:
    stored_before = _artifact_files()
    body = assert_error_shape(_upload(api_as(personas["ds"]), "model.pkl", b"\x80\x04" + b"x" * 10000), 413,
                              "too_large")
    assert "limit" in body["error"]["message"]
    assert not ModelVersion.objects.exists() and _artifact_files() == stored_before


@override_settings(PORTAL_MAX_UNPACKED_BYTES=1024 * 1024)
def test_a_compressed_joblib_bomb_is_refused(personas: dict[str, Any], model: RegisteredModel, api_as: Any) -> None:
    import zlib

    bomb = zlib.compress(b"\x80\x04" + b"\x00" * (5 * 1024 * 1024), 9)
    body = assert_error_shape(_upload(api_as(personas["ds"]), "model.joblib", bomb), 422)
    assert "decompresses to more" in body["error"]["message"]


def test_bad_metadata_is_a_400_and_stores_nothing(personas: dict[str, Any], model: RegisteredModel, api_as: Any,
                                                  tmp_path: Path) -> None:
    client = api_as(personas["ds"])
    stored_before = _artifact_files()
    data = files.skops_file(tmp_path / "m.skops").read_bytes()
    body = assert_error_shape(_upload(client, "m.skops", data, metrics="{not json"), 400, "invalid")
    assert "metrics is not valid JSON" in body["error"]["message"]
    body = assert_error_shape(_upload(client, "m.skops", data, metrics='{"auc": "high"}'), 400, "invalid")
    assert "finite number" in body["error"]["message"]
    assert_error_shape(_upload(client, "m.skops", data, git_commit="not-a-sha"), 400, "invalid")
    ref = SimpleUploadedFile("ref.csv", b"\xff\xfe\x00garbage")
    body = assert_error_shape(client.post("/api/v1/models/churn/versions/", {"file": SimpleUploadedFile("m.skops", data),
                                                                             "reference_data": ref}, format="multipart"),
                              400, "invalid")
    assert "CSV" in body["error"]["message"]
    assert_error_shape(client.post("/api/v1/models/churn/versions/", {}, format="multipart"), 400, "invalid")
    assert not ModelVersion.objects.exists() and _artifact_files() == stored_before


def test_json_instead_of_multipart_is_415(personas: dict[str, Any], model: RegisteredModel, api_as: Any) -> None:
    assert_error_shape(api_as(personas["ds"]).post("/api/v1/models/churn/versions/", {"file": "x"}, format="json"),
                       415, "unsupported_media_type")
