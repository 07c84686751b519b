"""Static inspection of an upload, done before anything is stored: what it is, what it contains, and whether it
may be kept. Every member of an archive is judged by its content, never by its name."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from django.conf import settings

from registry import sandbox
from registry.scanning import detect
from registry.scanning.archive import extract_zip
from registry.scanning.findings import Finding, UploadRejected
from registry.scanning.pickles import PickleRejected, scan_pickle

CODE_SUFFIXES = {".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".pyd", ".sh", ".exe"}
MAX_METADATA_BYTES = 5 * 1024 * 1024


@dataclass
class Inspection:
    format: str
    flavors: list[str] = field(default_factory=list)
    signature: dict[str, Any] = field(default_factory=dict)
    input_example: Any = None
    untrusted_types: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    mlflow_run_id: str = ""
    mlflow_meta: dict[str, Any] = field(default_factory=dict)


def _block(code: str, message: str, member: str = "") -> UploadRejected:
    return UploadRejected([Finding("block", code, message, member)])


def _scan_pickle_file(path: Path, label: str, *, limit: int) -> list[Finding]:
    try:
        with open(path, "rb") as fh:
            report = scan_pickle(fh, joblib=True, size_limit=path.stat().st_size)
    except PickleRejected as exc:
        where = f"{label}: " if label else ""
        raise _block("unsafe_pickle", f"{where}the pickle was refused because {exc}.", label) from None
    return [Finding("info", "pickle_scanned", f"{label or 'file'}: {len(report.globals_seen)} allowed imports, "
                    f"{report.arrays_skipped} arrays, {report.nested_pickles} nested pickles.", label)]


def _skops_untrusted(path: Path, label: str) -> list[str]:
    """The types in a skops file outside skops' default trusted set. skops reads only the schema and builds no
    objects; it still runs in the sandbox, which also keeps scikit-learn out of the web process's memory."""
    result = sandbox.skops_types(path)
    if not result.ok:
        raise _block("corrupt_skops", f"{label or 'file'}: the skops file cannot be read ({result.error[:200]}).",
                     label)
    return [str(t) for t in result.data.get("untrusted", [])]


def _check_onnx(path: Path, label: str, *, root: Path | None) -> dict[str, Any]:
    result = sandbox.inspect_onnx(path)
    if not result.ok:
        raise _block("corrupt_onnx", f"{label or 'file'}: not a readable ONNX model ({result.error}).", label)
    for ext in result.data.get("external_data", []):
        location = str(ext.get("location", ""))
        if root is None:
            raise _block("onnx_external_data",
                         f"{label or 'file'}: tensor {ext['tensor']!r} keeps its data in another file ({location!r}); "
                         "upload the model inside an MLflow model zip with that file, or embed the data.", label)
        target = (path.parent / location).resolve()
        if location.startswith("/") or ".." in PurePosixPath(location).parts or root.resolve() not in target.parents:
            raise _block("onnx_external_data",
                         f"{label}: tensor {ext['tensor']!r} points outside the archive ({location!r}).", label)
        if not target.is_file():
            raise _block("onnx_external_data", f"{label}: tensor {ext['tensor']!r} needs {location!r}, which is missing.",
                         label)
    return result.data


def _judge_file(path: Path, label: str, *, root: Path | None, limit: int, work: Path,
                untrusted: list[str], depth: int = 0) -> list[Finding]:
    """Judge one file (or archive member) by its content."""
    suffix = path.suffix.lower()
    if suffix in CODE_SUFFIXES:
        raise _block("code_in_archive", f"{label}: the portal accepts serialized models, not code files.", label)
    kind = detect.sniff_file(path)
    if kind == detect.PICKLE:
        return _scan_pickle_file(path, label, limit=limit)
    if kind == detect.COMPRESSED:
        out = detect.decompress_to(path, work / f"decompressed-{depth}-{path.name}", limit=limit)
        if detect.sniff_file(out) != detect.PICKLE:
            raise _block("unknown_content", f"{label}: a compressed file that does not hold a model.", label)
        return _scan_pickle_file(out, label, limit=limit)
    if kind == detect.ZIP:
        if depth >= 2:
            raise _block("nested_archive", f"{label}: archives nested this deep are not accepted.", label)
        inner = work / f"unzipped-{depth}-{abs(hash(label))}"
        files = extract_zip(path, inner)
        names = {str(f.relative_to(inner)) for f in files}
        if "schema.json" in names:
            untrusted.extend(_skops_untrusted(path, label))
            return [Finding("info", "skops_scanned", f"{label}: skops schema read.", label)]
        findings: list[Finding] = []
        for f in files:
            findings += _judge_file(f, f"{label}/{f.relative_to(inner)}", root=inner, limit=limit, work=work,
                                    untrusted=untrusted, depth=depth + 1)
        return findings
    if kind == detect.ONNX and suffix == ".onnx":
        _check_onnx(path, label, root=root)
        return [Finding("info", "onnx_checked", f"{label}: ONNX graph checked in the sandbox.", label)]
    if suffix in (".pkl", ".pickle", ".joblib", ".skops", ".onnx"):
        raise _block("content_mismatch", f"{label}: named {suffix} but its content is {kind}.", label)
    return []


def _load_mlmodel(root: Path) -> tuple[Path, dict[str, Any]]:
    candidates = [p for p in root.rglob("MLmodel") if len(p.relative_to(root).parts) <= 2]
    if len(candidates) != 1:
        raise _block("not_a_model", "the zip holds neither one MLflow model directory (an MLmodel file) nor a "
                                    "skops schema; zip the folder that MLflow's save_model wrote.")
    mlmodel = candidates[0]
    if mlmodel.stat().st_size > MAX_METADATA_BYTES:
        raise _block("metadata_too_large", "the MLmodel file is implausibly large.", "MLmodel")
    try:
        meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _block("bad_mlmodel", f"MLmodel is not valid YAML ({exc}).", "MLmodel") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("flavors"), dict):
        raise _block("bad_mlmodel", "MLmodel has no flavors section.", "MLmodel")
    return mlmodel.parent, meta


def _mlflow_signature(meta: dict[str, Any]) -> dict[str, Any]:
    raw = meta.get("signature") or {}
    signature: dict[str, Any] = {}
    for part in ("inputs", "outputs"):
        text = raw.get(part)
        if text:
            try:
                signature[part] = json.loads(text)
            except (TypeError, json.JSONDecodeError):
                raise _block("bad_signature", f"MLmodel's signature {part} is not valid JSON.", "MLmodel") from None
    return signature


def _mlflow_example(model_dir: Path, meta: dict[str, Any]) -> Any:
    info = meta.get("saved_input_example_info") or {}
    rel = info.get("artifact_path")
    if not rel:
        return None
    path = (model_dir / str(rel)).resolve()
    if model_dir.resolve() not in path.parents or not path.is_file() or path.stat().st_size > MAX_METADATA_BYTES:
        return None
    try:
        example = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _block("bad_example", "the input example is not valid JSON.", str(rel)) from None
    if isinstance(example, dict) and "dataframe_split" in example:
        example = example["dataframe_split"]
    return example


def inspect_upload(path: Path, original_name: str) -> Inspection:
    """Judge an uploaded file; raise UploadRejected with findings a person can act on, or describe it."""
    suffix = PurePosixPath(original_name.replace("\\", "/")).suffix.lower()
    kind = detect.sniff_file(path)
    expected = detect.EXPECTED_BY_EXTENSION.get(suffix)
    if expected is not None and kind not in expected:
        raise _block("content_mismatch", f"the file is named {suffix} but its content is {kind}; the portal goes "
                                         "by content, so rename it or upload the right file.")
    limit = settings.PORTAL_MAX_UNPACKED_BYTES
    tmp_root = Path(settings.VAR_DIR) / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="inspect-", dir=tmp_root) as tmp:
        work = Path(tmp)
        if kind == detect.ZIP:
            root = work / "archive"
            files = extract_zip(path, root)
            names = {str(f.relative_to(root)) for f in files}
            if "schema.json" in names and not any(n.endswith("MLmodel") for n in names):
                return Inspection(format="skops", flavors=["sklearn"], untrusted_types=_skops_untrusted(path, ""),
                                  findings=[Finding("info", "skops_scanned", "skops schema read.")])
            model_dir, meta = _load_mlmodel(root)
            untrusted: list[str] = []
            findings: list[Finding] = []
            for f in files:
                findings += _judge_file(f, str(f.relative_to(root)), root=root, limit=limit, work=work,
                                        untrusted=untrusted, depth=1)
            flavors = sorted(meta["flavors"])
            return Inspection(
                format="mlflow", flavors=flavors, signature=_mlflow_signature(meta),
                input_example=_mlflow_example(model_dir, meta), untrusted_types=sorted(set(untrusted)),
                findings=findings, mlflow_run_id=str(meta.get("run_id") or ""),
                mlflow_meta={"mlflow_version": meta.get("mlflow_version"), "model_uuid": meta.get("model_uuid"),
                             "root": str(model_dir.relative_to(root))},
            )
        if kind in (detect.PICKLE, detect.COMPRESSED):
            findings = _judge_file(path, "", root=None, limit=limit, work=work, untrusted=[])
            fmt = "joblib" if suffix == ".joblib" or kind == detect.COMPRESSED else "pickle"
            return Inspection(format=fmt, flavors=["sklearn"], findings=findings)
        if kind == detect.ONNX:
            data = _check_onnx(path, "", root=None)
            return Inspection(format="onnx", flavors=["onnx"],
                              signature={"inputs": data.get("inputs", []), "outputs": data.get("outputs", [])},
                              findings=[Finding("info", "onnx_checked", "ONNX graph checked in the sandbox.")])
    raise _block("unknown_format", f"the content is {kind}, not a model file the portal accepts: upload a zip of an "
                                   "MLflow model directory, a .skops, .onnx, .pkl or .joblib file.")
