"""Edge packages end to end: built by a real Celery worker (the conversion in the real sandbox), downloaded through
the API (audited), run in a fresh interpreter that holds only onnxruntime and numpy, and compared with what the
portal serves for the same rows; the offline verifier attacked with a flipped byte and a foreign key; a model that
cannot be converted is refused with the reason."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.test import Client
from rest_framework.test import APIClient

from portal import services as portal_services
from portal.models import AuditEvent
from registry.edge import services as edge
from registry.edge.portal_edge import ed25519_verify, public_key_bytes
from registry.models import EdgePackage, ModelVersion
from tests.conftest import EntryPointClient, wait_for
from tests.registry.conftest import two_versions  # noqa: F401 - fixtures
from tests.registry.edge.conftest import COLUMNS, bare_env, edge_data

pytestmark = pytest.mark.django_db


def runner(python: Path, package: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-m", "portal_edge", *args], cwd=package, capture_output=True, text=True,
                          input=stdin, timeout=120, env=bare_env())


def unpack(content: bytes, dest: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        archive.extractall(dest)
    (top,) = list(dest.iterdir())
    return top


def rows_json(n: int, start: int = 0) -> tuple[list[list[float]], str]:
    X, _y = edge_data()
    rows = X.iloc[start:start + n].to_numpy().tolist()
    return rows, json.dumps({"dataframe_split": {"columns": COLUMNS, "data": rows}})


def reference_csv(dest: Path, n: int = 300) -> tuple[Path, list[int]]:
    X, y = edge_data()
    X.head(n).to_csv(dest, index=False)
    return dest, [int(v) for v in y.head(n)]


def served(name: str, token: str, body: str) -> list[Any]:
    """What the portal answers for ``body`` in dev, through the production entry point."""
    client = EntryPointClient(HTTP_AUTHORIZATION=f"Bearer {token}")
    answer = client.post(f"/api/v1/serve/{name}/dev/invocations", body, content_type="application/json")
    assert answer.status_code == 200, answer.content
    return list(json.loads(answer.content)["predictions"])


@pytest.mark.slow
def test_packages_built_by_a_worker_run_offline_with_only_onnxruntime_and_numpy(
        worker_factory: Any, edge_lr: ModelVersion, edge_xgb: ModelVersion, personas: dict[str, Any],
        bare_python: Path, tmp_path: Path) -> None:
    worker_factory()
    _t, token = portal_services.token_create(user=personas["ds"], name="ci", actor=personas["ds"])
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    uids, deployments = {}, {}
    for version in (edge_lr, edge_xgb):
        answer = api.post(f"/api/v1/models/{version.model.name}/edge-packages/", {"version": 1}, format="json")
        assert answer.status_code == 202, answer.content
        uids[version.model.name] = answer.json()["id"]
        answer = api.post(f"/api/v1/models/{version.model.name}/versions/1/deploy", {"environment": "dev"},
                          format="json")
        assert answer.status_code == 202, answer.content
        deployments[version.model.name] = answer.json()["id"]

    def finished() -> bool:
        return all(api.get(f"/api/v1/edge-packages/{u}/").json()["status"] in ("ready", "failed") for u in uids.values()
                   ) and all(api.get(f"/api/v1/deployments/{d}/").json()["status"] in ("live", "failed")
                             for d in deployments.values())

    wait_for(finished, timeout=300, interval=1, what="both packages built and both versions live in dev")
    for name, d in deployments.items():
        assert api.get(f"/api/v1/deployments/{d}/").json()["status"] == "live", name
    details = {name: api.get(f"/api/v1/edge-packages/{u}/").json() for name, u in uids.items()}
    for name, data in details.items():
        assert data["status"] == "ready", (name, data["error"], data["log"][-3:])
    # The linear model's MatMul quantizes; the tree ensemble has nothing onnxruntime's dynamic quantization takes.
    lr_forms = {f["name"]: f for f in details["edge-lr"]["forms"]}
    assert set(lr_forms) == {"fp32", "int8"}, details["edge-lr"]["int8_note"]
    assert "accuracy" in lr_forms["fp32"]["metrics"] and lr_forms["int8"]["size"] > 0
    assert [f["name"] for f in details["edge-xgb"]["forms"]] == ["fp32"]
    assert "nothing to quantize" in details["edge-xgb"]["int8_note"]

    public_key = api.get("/api/v1/edge/public-key").content.decode()
    (tmp_path / "portal-edge-key.pem").write_text(public_key)
    for version in (edge_lr, edge_xgb):
        name = version.model.name
        download = api.get(f"/api/v1/edge-packages/{uids[name]}/download")
        assert download.status_code == 200
        content = b"".join(download.streaming_content)
        assert AuditEvent.objects.filter(action="edge.package_download", target_id=uids[name]).count() == 1
        package = unpack(content, tmp_path / name)

        verified = runner(bare_python, package, "verify", "--public-key", str(tmp_path / "portal-edge-key.pem"))
        assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout + verified.stderr

        _rows, body = rows_json(40)
        offline = runner(bare_python, package, "-", "--no-store", stdin=body)
        assert offline.returncode == 0, offline.stderr
        predictions = json.loads(offline.stdout)["predictions"]
        assert predictions == served(name, token, body), f"{name}: the fp32 form answers what the portal serves"

    # int8: within the tolerance of the float form on the reference rows, measured here by the runner itself
    package = tmp_path / "edge-lr" / "edge-lr-v1-edge"
    source, truth = reference_csv(tmp_path / "reference.csv")
    accuracy = {}
    for form in ("fp32", "int8"):
        result = runner(bare_python, package, str(source), "--form", form, "--no-store")
        assert result.returncode == 0, result.stderr
        answers = json.loads(result.stdout)["predictions"]
        accuracy[form] = sum(int(a) == t for a, t in zip(answers, truth, strict=True)) / len(truth)
    assert accuracy["fp32"] - accuracy["int8"] <= settings.PORTAL_EDGE_INT8_TOLERANCE + 1e-12, accuracy
    assert abs(accuracy["fp32"] - lr_forms["fp32"]["metrics"]["accuracy"]) < 1e-12


def _build_in_process(version: ModelVersion, personas: dict[str, Any], *, int8: bool = False) -> EdgePackage:
    package = edge.edge_package_request(version=version, int8=int8, actor=personas["ds"])
    built = edge.edge_package_build(package_id=package.pk)
    assert built is not None
    return built


def _package_folder(package: EdgePackage, dest: Path) -> Path:
    from registry import storage

    assert package.blob is not None
    with storage.verified_local_path(package.blob) as path:
        return unpack(path.read_bytes(), dest)


def test_verify_rejects_a_flipped_byte_and_a_manifest_signed_by_another_key(
        edge_lr: ModelVersion, personas: dict[str, Any], bare_python: Path, tmp_path: Path) -> None:
    package = _build_in_process(edge_lr, personas)
    assert package.status == "ready", package.error
    pristine = _package_folder(package, tmp_path / "pristine")
    page = Client()
    page.force_login(personas["viewer"])
    shown = page.get("/models/edge-lr/").content.decode()
    assert 'data-testid="edge-panel"' in shown and "fp32" in shown and "accuracy" in shown
    shown = page.get(f"/edge/{package.uid}/").content.decode()
    assert "Ready" in shown and 'data-testid="edge-download"' not in shown  # viewers read, do not download
    assert "Devices last reported: never" in page.get("/models/edge-lr/edge/").content.decode()
    portal_key = tmp_path / "portal.pem"
    shutil.copyfile(pristine / "public_key.pem", portal_key)
    assert runner(bare_python, pristine, "verify").returncode == 0

    flipped = shutil.copytree(pristine, tmp_path / "flipped" / pristine.name)
    data = bytearray((flipped / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / "model.onnx").write_bytes(bytes(data))
    result = runner(bare_python, flipped, "verify")
    assert result.returncode == 1 and "model.onnx: its SHA-256" in result.stdout, result.stdout
    refused = runner(bare_python, flipped, "-", "--no-store", stdin=rows_json(2)[1])
    assert refused.returncode == 1 and "does not verify" in refused.stderr  # the runner never loads it

    # Someone else's key signs a manifest that vouches for their own model file.
    forged = shutil.copytree(pristine, tmp_path / "forged" / pristine.name)
    other = Ed25519PrivateKey.generate()
    manifest = json.loads((forged / "manifest.json").read_bytes())
    (forged / "model.onnx").write_bytes((forged / "model.onnx").read_bytes() + b"\0")
    manifest["files"]["model.onnx"] = hashlib.sha256((forged / "model.onnx").read_bytes()).hexdigest()
    raw = json.dumps(manifest).encode()
    (forged / "manifest.json").write_bytes(raw)
    (forged / "manifest.json.sig").write_bytes(base64.b64encode(other.sign(raw)))
    result = runner(bare_python, forged, "verify")
    assert result.returncode == 1 and "signature does not verify" in result.stdout, result.stdout
    # ... and swaps the package's public key for theirs: the portal's key, given to verify, still refuses it.
    (forged / "public_key.pem").write_bytes(other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    result = runner(bare_python, forged, "verify", "--public-key", str(portal_key))
    assert result.returncode == 1 and "signature does not verify" in result.stdout, result.stdout


def test_a_model_without_a_proven_onnx_form_is_refused_with_the_reason(
        two_versions: list[ModelVersion], personas: dict[str, Any]) -> None:  # noqa: F811
    # v1 of churn is a scaler and a logistic regression in a pipeline: no probes prove its conversion.
    package = _build_in_process(two_versions[0], personas)
    assert package.status == "failed" and package.blob is None
    assert "no ONNX form of this version was proven" in package.error
    assert "sandboxed model host is the only way to serve it" in package.error
    assert AuditEvent.objects.filter(action="edge.package_fail", target_id=str(package.uid)).exists()


def test_only_makers_build_packages_and_a_second_build_waits_for_the_first(
        edge_lr: ModelVersion, personas: dict[str, Any]) -> None:
    viewer = APIClient()
    viewer.force_authenticate(personas["viewer"])
    assert viewer.post("/api/v1/models/edge-lr/edge-packages/", {"version": 1}, format="json").status_code == 403
    ds = APIClient()
    ds.force_authenticate(personas["ds"])
    assert ds.post("/api/v1/models/edge-lr/edge-packages/", {"version": 1}, format="json").status_code == 202
    again = ds.post("/api/v1/models/edge-lr/edge-packages/", {"version": 1}, format="json")
    assert again.status_code == 400 and "already being built" in again.content.decode()
    assert ds.post("/api/v1/models/edge-lr/edge-packages/", {"version": 9}, format="json").status_code == 404
    assert EdgePackage.objects.filter(version=edge_lr).count() == 1


def test_the_pure_python_ed25519_agrees_with_cryptography() -> None:
    for size in (0, 1, 64, 1000):
        key = Ed25519PrivateKey.generate()
        message = bytes(range(256)) * (size // 256) + bytes(size % 256)
        signature = key.sign(message)
        public = public_key_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
        assert ed25519_verify(public, message, signature)
        assert not ed25519_verify(public, message + b"x", signature)
        assert not ed25519_verify(public, message, signature[:-1] + bytes([signature[-1] ^ 1]))
        other = Ed25519PrivateKey.generate()
        assert not ed25519_verify(public, message, other.sign(message))


def test_the_int8_verdict_holds_the_tolerance(settings: Any) -> None:
    from registry.edge.package import int8_verdict

    settings.PORTAL_EDGE_INT8_TOLERANCE = 0.01
    assert int8_verdict({"accuracy": 0.90}, {"accuracy": 0.895}, 0.99, None, False)[0]
    assert not int8_verdict({"accuracy": 0.90}, {"accuracy": 0.88}, 0.99, None, False)[0]
    assert int8_verdict({}, {}, 0.995, None, False)[0]
    assert not int8_verdict({}, {}, 0.98, None, False)[0]
    assert int8_verdict({"mae": 1.0}, {"mae": 1.009}, 1.0, 0.0, True)[0]
    assert not int8_verdict({"mae": 1.0}, {"mae": 1.02}, 1.0, 0.0, True)[0]
    assert not int8_verdict({}, {}, 1.0, 0.05, True)[0]
