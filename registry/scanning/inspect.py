"""Static inspection of an upload, done before anything is stored: what it is, what it contains, and whether it
may be kept. Every member of an archive is judged by its content, never by its name."""

from __future__ import annotations

import json
import re
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
from registry.scanning.onnxgraph import OnnxRefused, review_onnx
from registry.scanning.pickles import PickleRejected, scan_pickle

# .pth: a path hook (site runs its import lines); .egg and .whl: zips Python imports from when on sys.path.
CODE_SUFFIXES = {".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".pyd", ".sh", ".exe", ".pth", ".egg", ".whl"}
MAX_METADATA_BYTES = 5 * 1024 * 1024
# Flavor configuration keys naming the file (or folder) a flavor loads as the model; MLflow's sklearn, pyfunc and
# lightgbm flavors load these with pickle or cloudpickle.
MODEL_FILE_KEYS = ("pickled_model", "model_path", "data", "python_model", "model_data", "model_file")
# What a named model file may be besides a pickle the scanner passes, a skops zip or an ONNX graph: XGBoost's JSON
# and UBJSON models start with '{', LightGBM's text model with 'tree\n'. No unpickler can start on either: '{' is no
# opcode and 't' (TUPLE) needs a MARK first.
NATIVE_MODEL_HEADS = (b"{", b"tree\n")
LOADER_MODULE = re.compile(r"mlflow(\.[A-Za-z_][A-Za-z0-9_]*)+")
_EOCD = b"PK\x05\x06"
_IMPORTABLE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


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
    """The sandbox parses the graph and lists every tensor that keeps its data in another file, wherever it stands
    (``child.external_data_references``). A bare ONNX upload, the one form a web worker may run in-process, must
    keep every tensor inside the file, and the portal checks that itself too (``onnxgraph.review_onnx``) rather
    than trust the sandbox's word; inside an MLflow archive (served only by a sandboxed host, from its own copy of
    the archive) a reference must name a file of the archive."""
    result = sandbox.inspect_onnx(path)
    if not result.ok:
        raise _block("corrupt_onnx", f"{label or 'file'}: not a readable ONNX model ({result.error}).", label)
    external = list(result.data.get("external_data", []))
    if root is None:
        try:
            review = review_onnx(path.read_bytes())
        except OnnxRefused as exc:
            raise _block("corrupt_onnx", f"{label or 'file'}: {exc}.", label) from None
        external += review.external
    for ext in external:
        location = str(ext.get("location", ""))
        where = f"tensor {ext.get('tensor', '')!r} (at {ext.get('where') or 'an initializer'})"
        if root is None:
            raise _block("onnx_external_data",
                         f"{label or 'file'}: {where} keeps its data in another file ({location!r}); the portal "
                         "accepts a bare ONNX file only with every tensor inside it (embed the data, or upload an "
                         "MLflow model zip that holds that file).", label)
        target = (path.parent / location).resolve()
        if (not location or location.startswith("/") or ".." in PurePosixPath(location).parts
                or root.resolve() not in target.parents):
            raise _block("onnx_external_data", f"{label}: {where} points outside the archive ({location!r}).", label)
        if not target.is_file():
            raise _block("onnx_external_data", f"{label}: {where} needs {location!r}, which is missing.", label)
    return result.data


def _hides_a_zip(path: Path) -> bool:
    """Whether a zip's end-of-central-directory record appears anywhere in the file: zipimport finds an archive from
    its end, so text with a zip appended is an importable archive once its path is on sys.path."""
    tail = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            if _EOCD in tail + chunk:
                return True
            tail = chunk[-(len(_EOCD) - 1):]
    return False


def _scan_as_pickle(path: Path, label: str, why: str) -> list[Finding]:
    """Scan content that sniffing could not classify as a format the portal checks: it must be a clean pickle."""
    try:
        with open(path, "rb") as fh:
            report = scan_pickle(fh, joblib=True, size_limit=path.stat().st_size)
    except PickleRejected as exc:
        raise _block("unsafe_pickle", f"{label}: {why}, so it must be a pickle the scanner passes, and it is "
                                      f"not: {exc}.", label) from None
    return [Finding("info", "pickle_scanned", f"{label}: scanned as a pickle, {len(report.globals_seen)} allowed "
                                              f"imports.", label)]


def _probe_text(path: Path, label: str) -> list[Finding]:
    """Text can be a protocol 0 pickle. Text that names a forbidden, importable global in pickle form is refused;
    text that is simply not a pickle (YAML, JSON, CSV) fails at its first opcodes, or names no importable module
    ('channels:' reads as GLOBAL 'hannels:'), and is kept."""
    try:
        with open(path, "rb") as fh:
            scan_pickle(fh, joblib=True, size_limit=path.stat().st_size)
    except PickleRejected as exc:
        if exc.global_name is not None and _IMPORTABLE.fullmatch(exc.global_name):
            raise _block("unsafe_pickle", f"{label}: this text is a pickle, refused because {exc}.", label) from None
    return []


def _judge_file(path: Path, label: str, *, root: Path | None, limit: int, work: Path,
                untrusted: list[str], depth: int = 0, model_file: str = "") -> list[Finding]:
    """Judge one file (or archive member) by its content. ``model_file`` names the MLmodel key that makes the file
    one a flavor loads as its model (MLflow unpickles it whatever its first bytes)."""
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
    if kind == detect.ONNX:
        _check_onnx(path, label, root=root)
        return [Finding("info", "onnx_checked", f"{label}: ONNX graph checked in the sandbox.", label)]
    if suffix in (".pkl", ".pickle", ".joblib", ".skops", ".onnx"):
        raise _block("content_mismatch", f"{label}: named {suffix} but its content is {kind}.", label)
    if kind in (detect.TEXT, detect.UNKNOWN) and _hides_a_zip(path):
        raise _block("hidden_zip", f"{label}: a zip archive is hidden inside this {kind} file; Python imports "
                                   "modules from such a file once its path is on sys.path. Remove it.", label)
    if model_file:
        with open(path, "rb") as fh:
            head = fh.read(8)
        if head.startswith(NATIVE_MODEL_HEADS):
            return [Finding("info", "native_model", f"{label}: a native XGBoost or LightGBM model file.", label)]
        return _scan_as_pickle(path, label, f"MLmodel names it as the model ({model_file}), which MLflow unpickles")
    if kind == detect.UNKNOWN:
        return _scan_as_pickle(path, label, "its content is no format the portal recognises")
    if kind == detect.TEXT:
        return _probe_text(path, label)
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


def _inside(root: Path, base: Path, rel: Any) -> Path | None:
    if not isinstance(rel, str) or not rel.strip():
        return None
    target = (base / rel).resolve()
    return target if target == root.resolve() or root.resolve() in target.parents else None


def _files_at(target: Path) -> list[Path]:
    if target.is_file():
        return [target]
    return sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else []


CODE_PREFIX = "custom code: "


def carried_code(root: Path, model_dir: Path, meta: dict[str, Any]) -> tuple[list[str], set[Path]]:
    """What code an MLflow model brings, as lines an approver reads, and the members that are that code: a custom
    ``python_model`` (cloudpickled), ``code``/``code_paths`` (put first on sys.path), a ``loader_module`` outside
    MLflow's own flavors. Such a model is held until an approver who did not upload it trusts it; it then loads only
    in the sandbox, like every model."""
    lines: list[str] = []
    members: set[Path] = set()
    for flavor, conf in meta["flavors"].items():
        if not isinstance(conf, dict):
            continue
        loader = conf.get("loader_module")
        if isinstance(loader, str) and loader and not LOADER_MODULE.fullmatch(loader):
            lines.append(f"{CODE_PREFIX}{flavor} flavor imports loader_module {loader}")
        code_path = conf.get("model_code_path")
        if isinstance(code_path, str) and code_path:
            # Models from code: MLflow copies the script into the model folder and runs it to build the model.
            found = [p for p in model_dir.glob(PurePosixPath(code_path).name) if p.is_file()]
            members.update(found)
            lines.append(f"{CODE_PREFIX}{flavor} flavor runs its model code ({PurePosixPath(code_path).name})")
        data = conf.get("data")
        if flavor in PICKLED_FLAVORS and isinstance(data, str) and data:
            # statsmodels pickles its own result classes (and pandas', patsy's): more classes than the pickle
            # allowlist can vouch for, so the pickle is treated as what it is, code the approver decides on.
            target = _inside(root, model_dir, data)
            if target is not None and _files_at(target):
                members.update(_files_at(target))
                lines.append(f"{CODE_PREFIX}{flavor} flavor unpickles its model ({data}) with {flavor}'s own "
                             "classes, which the portal's pickle allowlist does not cover")
        python_model = conf.get("python_model")
        if flavor == "python_function" and isinstance(python_model, str) and python_model:
            target = _inside(root, model_dir, python_model)
            if target is not None:
                members.update(_files_at(target))
                lines.append(f"{CODE_PREFIX}{flavor} flavor unpickles a custom PythonModel ({python_model})")
        for key in ("code", "code_paths"):
            value = conf.get(key)
            for rel in (value if isinstance(value, list) else [value]) if value else []:
                target = _inside(root, model_dir, rel)
                found = _files_at(target) if target else []
                members.update(found)
                if found:
                    lines.append(f"{CODE_PREFIX}{flavor} flavor puts {rel} on sys.path ({len(found)} files)")
                for f in found:
                    if f.suffix.lower() in (".zip", ".egg", ".whl") or _hides_a_zip(f):
                        lines.append(f"{CODE_PREFIX}{f.relative_to(root)} holds a zip archive Python imports "
                                     "modules from")
    if lines:
        members.update(p for p in model_dir.rglob("*") if p.is_file() and p.suffix.lower() in CODE_SUFFIXES)
    return sorted(set(lines)), {m.resolve() for m in members}


# Flavors whose model file is a pickle of the library's own classes (beyond the allowlist's scikit-learn, XGBoost
# and LightGBM): held for an approver's trust decision like code, then loaded only in the sandbox.
PICKLED_FLAVORS = ("statsmodels",)

# MLflow flavor -> the Python package its loader imports (where the names differ).
FLAVOR_LIBRARIES = {"sklearn": "sklearn", "pytorch": "torch", "tensorflow": "tensorflow", "keras": "keras",
                    "transformers": "transformers", "sentence_transformers": "sentence_transformers",
                    "spacy": "spacy", "catboost": "catboost", "prophet": "prophet", "h2o": "h2o",
                    "paddle": "paddle", "spark": "pyspark", "onnx": "onnxruntime", "statsmodels": "statsmodels",
                    "xgboost": "xgboost", "lightgbm": "lightgbm", "pmdarima": "pmdarima"}


def _missing_library(meta: dict[str, Any]) -> Finding | None:
    """The library the model's pyfunc loader needs, when this portal does not have it installed."""
    import importlib.util

    pyfunc = meta["flavors"].get("python_function")
    loader = pyfunc.get("loader_module") if isinstance(pyfunc, dict) else None
    if not isinstance(loader, str) or not loader.startswith("mlflow.") or loader.startswith("mlflow.pyfunc"):
        return None
    flavor = loader.split(".")[1]
    library = FLAVOR_LIBRARIES.get(flavor, flavor)
    if importlib.util.find_spec(library) is not None:
        return None
    return Finding("block", "flavor_not_installed",
                   f"This is an MLflow {flavor} model and the portal does not have {library} installed, so it cannot "
                   f"load it. Ask an administrator to install {library}, or log the model with a flavor the portal "
                   "has (sklearn, xgboost, lightgbm, onnx, statsmodels where installed, or python_function).",
                   "MLmodel")


def _mlmodel_rules(root: Path, model_dir: Path, meta: dict[str, Any], *, code_held: bool = False) -> dict[Path, str]:
    """Apply MLmodel's own rules and return the files each flavor loads as its model, by the key naming them.
    Code (``code`` paths, loader modules outside MLflow's flavors) is refused unless ``code_held``: the version then
    waits for an approver's trust decision (``carried_code``)."""
    missing = _missing_library(meta)
    findings: list[Finding] = [missing] if missing else []
    model_files: dict[Path, str] = {}
    for flavor, conf in meta["flavors"].items():
        if not isinstance(conf, dict):
            continue
        loader = conf.get("loader_module")
        if not code_held and loader is not None and not (isinstance(loader, str) and LOADER_MODULE.fullmatch(loader)):
            findings.append(Finding("block", "loader_module",
                                    f"MLmodel's {flavor} flavor has loader_module {loader!r}, which is not one of "
                                    "MLflow's own flavor modules (mlflow.*); MLflow would import it to load the "
                                    "model. Save the model with a built-in flavor.", "MLmodel"))
        for key in ("code", "code_paths"):
            value = conf.get(key)
            if not value or code_held:
                continue
            paths = value if isinstance(value, list) else [value]
            named = []
            for rel in paths:
                target = _inside(root, model_dir, rel)
                for f in _files_at(target) if target else []:
                    member = str(f.relative_to(root))
                    if f.suffix.lower() in (".zip", ".egg", ".whl") or _hides_a_zip(f):
                        findings.append(Finding("block", "hidden_zip",
                                                f"{member}: a code path holds a zip archive; Python imports modules "
                                                "from it once the path is on sys.path.", member))
                named.append(str(rel))
            findings.append(Finding("block", "code_in_archive",
                                    f"MLmodel's {flavor} flavor names code ({key}: {', '.join(named)}), which MLflow "
                                    "puts on sys.path and imports from; the portal accepts serialized models, not "
                                    "code.", "MLmodel"))
        refs: list[tuple[str, Any]] = [(key, conf.get(key)) for key in MODEL_FILE_KEYS]
        artifacts = conf.get("artifacts")
        if isinstance(artifacts, dict):
            refs += [("artifacts", a.get("path")) for a in artifacts.values() if isinstance(a, dict)]
        for key, rel in refs:
            target = _inside(root, model_dir, rel)
            if target is None and isinstance(rel, str) and rel.strip():
                findings.append(Finding("block", "unsafe_path", f"MLmodel's {flavor} flavor names {rel!r} as {key}, "
                                                                "which is outside the model.", "MLmodel"))
            for f in _files_at(target) if target else []:
                model_files.setdefault(f, f"{flavor}.{key}")
    blocking = [f for f in findings if f.severity == "block"]
    if blocking:
        raise UploadRejected(blocking)
    return model_files


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON holds it: NaN and the infinities (which MLflow writes into ``input_example.json``
    and Python's json reads, but PostgreSQL's JSON refuses) become null, which MLflow's own reading of a request
    turns back into NaN (a missing value) in a number column."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _mlflow_signature(meta: dict[str, Any]) -> dict[str, Any]:
    raw = meta.get("signature") or {}
    signature: dict[str, Any] = {}
    for part in ("inputs", "outputs", "params"):
        text = raw.get(part)
        if text:
            try:
                signature[part] = json_safe(json.loads(text))
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
        example = json_safe(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _block("bad_example", "the input example is not valid JSON.", str(rel)) from None
    if isinstance(example, dict) and "inputs" in example and set(example) <= {"inputs", "params"}:
        example = example["inputs"]  # logged with params: MLflow wraps the example as {"inputs", "params"}
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
            code, code_members = carried_code(root, model_dir, meta)
            model_files = _mlmodel_rules(root, model_dir, meta, code_held=bool(code))
            untrusted: list[str] = list(code)
            findings: list[Finding] = []
            if code:
                findings.append(Finding("wait", "carries_code", "The model brings its own code ("
                                        + "; ".join(c.removeprefix(CODE_PREFIX) for c in code) + "): it waits "
                                        "for an approver's trust decision and then runs only in the sandbox."))
            for f in files:
                if f.resolve() in code_members:
                    continue  # code, shown to the approver; the sandbox, not the scanner, is its boundary
                findings += _judge_file(f, str(f.relative_to(root)), root=root, limit=limit, work=work,
                                        untrusted=untrusted, depth=1, model_file=model_files.get(f.resolve(), ""))
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
