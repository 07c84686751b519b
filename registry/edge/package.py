"""Building an edge package's files: the forms (measured on the reference rows), the manifest and its signature.

The float form is the version's proven ONNX form (``registry.deployments.services.proven_onnx_form``: converted in
the sandbox, proven here on the reference rows, the input example and the boundary probes), or an uploaded ONNX
graph that the in-process path runs. The int8 form is made here from that proven graph by onnxruntime's dynamic
quantization (a rewrite of the graph's protobuf: no model code runs), and offered only when its metrics on the
reference rows stay within ``PORTAL_EDGE_INT8_TOLERANCE`` of the float form's. Both are run here only by the
in-process predictor (graph review, one thread, the arena cap, a deadline per run).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import statistics
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings

from registry import storage
from registry.deployments.services import (
    MAX_REFERENCE_ROWS,
    DeploymentFailed,
    PreparedForm,
    _example,
    _reference_matrix,
    _review_onnx_file,
    proven_onnx_form,
)
from registry.edge import signing
from registry.models import ModelVersion
from registry.scanning.onnxgraph import OnnxRefused, OnnxSandboxOnly
from registry.serving.runtime import inferred_signature, input_columns, load_onnx_predictor
from registry.versions import profiling

FORMAT = "portal-edge/1"
RUNNER_SOURCE = Path(__file__).resolve().parent / "portal_edge"
LATENCY_ROWS = 200  # single-row runs timed per form (the device's usual call)
SANDBOX_ONLY = ("The sandboxed model host is the only way to serve it: it stays in the portal (deploy it), and no "
                "edge package can carry it.")


class PackageRefused(Exception):
    """This version cannot be packaged for the edge; the message says why."""


@dataclass
class Form:
    name: str
    file: str
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    latency_ms_p50: float = 0.0
    latency_us_per_row_batch: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        size = self.path.stat().st_size
        return {"name": self.name, "file": self.file, "size": size, "sha256": _sha256(self.path),
                "metrics": self.metrics, "latency_ms_p50": round(self.latency_ms_p50, 4),
                "latency_us_per_row_batch": round(self.latency_us_per_row_batch, 3)}


@dataclass
class Built:
    zip_path: Path
    forms: list[dict[str, Any]]
    manifest: dict[str, Any]
    int8_note: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def float_form(version: ModelVersion, work: Path) -> tuple[Path, PreparedForm | None, str]:
    """(the float ONNX file, how it was proven, a sentence on it). Raises ``PackageRefused`` saying why a version
    has no form a device could run (and that the sandboxed host is then the only way to serve it)."""
    assert version.artifact is not None
    if version.format == "onnx":
        with storage.verified_local_path(version.artifact) as path:
            try:
                review = _review_onnx_file(path, "the uploaded ONNX graph")
            except DeploymentFailed as exc:
                raise PackageRefused(f"{exc}. {SANDBOX_ONLY}") from None
            if review.sandbox_reasons:
                raise PackageRefused(f"the uploaded ONNX graph uses {'; '.join(review.sandbox_reasons)}, which the "
                                     f"portal runs only in a sandboxed model host. {SANDBOX_ONLY}")
            target = work / "model.onnx"
            shutil.copyfile(path, target)
        return target, None, "the uploaded ONNX graph itself (there is no other form to agree with)"
    if version.format == "mlflow" and inferred_signature(version):
        raise PackageRefused("the version has no signature, so only MLflow's own scoring code answers it and no "
                             f"ONNX form can be proven against named inputs. {SANDBOX_ONLY}")
    try:
        prepared = proven_onnx_form(version, work)
    except DeploymentFailed as exc:
        raise PackageRefused(str(exc)) from None
    if prepared.path is None or prepared.proof is None:
        raise PackageRefused(f"no ONNX form of this version was proven to predict what the model predicts "
                             f"({prepared.reason}). {SANDBOX_ONLY}")
    return prepared.path, prepared, f"{prepared.proof.form}: {prepared.proof.summary()}"


def reference_rows(version: ModelVersion, prepared: PreparedForm | None) -> tuple[Any, Any, list[str]]:
    """(reference rows in serving order or None, their true values or None, the columns)."""
    example = prepared.example if prepared is not None else _example(version)
    columns = list(example.columns) or input_columns(version)
    reference = prepared.reference if prepared is not None else _reference_matrix(
        version, example.columns, len(example.rows[0]))[0]
    if reference is None or version.reference is None:
        return reference, None, columns
    try:
        with storage.verified_local_path(version.reference.blob) as path:
            table = profiling.read_table(path, version.reference.format)
    except (profiling.ReferenceDataError, storage.IntegrityError):
        return reference, None, columns
    names = [str(n) for n in table.column_names]
    others = [n for n in names if n not in set(columns)]
    if len(others) != 1:  # the reference's one column that is not an input holds the true values (as monitoring)
        return reference, None, columns
    truth = np.asarray(table.column(others[0]).to_pylist(), dtype=object)
    if len(truth) > MAX_REFERENCE_ROWS:
        truth = truth[np.linspace(0, len(truth) - 1, MAX_REFERENCE_ROWS).astype(int)]
    return reference, truth if len(truth) == len(reference) else None, columns


def _predict_all(predict: Any, matrix: Any) -> Any:
    parts = [np.asarray(predict(matrix[i:i + 20_000])).reshape(len(matrix[i:i + 20_000]), -1)
             for i in range(0, len(matrix), 20_000)]
    return np.concatenate(parts).ravel() if parts else np.empty(0)


def _is_regression(predictions: Any) -> bool:
    return np.asarray(predictions).dtype.kind == "f"


def _same(a: Any, b: Any) -> Any:
    """Row by row: does the label ``a`` equal ``b``: as numbers when both are (1, 1.0 and True alike, as a CSV's
    column may hold them), else as text."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "biuf":
        fb = _numbers(b)
        if fb is not None:
            return a.astype(np.float64) == fb
    return np.asarray([str(x) == str(y) for x, y in zip(a.tolist(), b.tolist(), strict=True)])


def _numbers(values: Any) -> Any:
    try:
        return np.asarray([np.nan if v is None else float(v) for v in np.asarray(values).tolist()], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def form_metrics(predictions: Any, truth: Any) -> dict[str, Any]:
    """Accuracy (classifiers) or MAE (regressors) against the reference's true values, on the rows that have one."""
    if truth is None:
        return {}
    if _is_regression(predictions):
        actual = _numbers(truth)
        if actual is None:
            return {}
        known = np.isfinite(actual) & np.isfinite(np.asarray(predictions, dtype=np.float64))
        if not known.any():
            return {}
        return {"mae": float(np.mean(np.abs(np.asarray(predictions, dtype=np.float64)[known] - actual[known]))),
                "rows": int(known.sum())}
    known = np.asarray([t is not None for t in truth.tolist()])
    if not known.any():
        return {}
    return {"accuracy": float(np.mean(_same(np.asarray(predictions)[known], truth[known]))), "rows": int(known.sum())}


def _latency(predict: Any, rows: Any) -> tuple[float, float]:
    """(median milliseconds of a one-row run over up to ``LATENCY_ROWS`` rows, microseconds per row of one batch)."""
    single = []
    for row in rows[:LATENCY_ROWS]:
        began = time.perf_counter()
        predict(row[None, :])
        single.append((time.perf_counter() - began) * 1000)
    began = time.perf_counter()
    _predict_all(predict, rows)
    batch = (time.perf_counter() - began) * 1e6 / max(1, len(rows))
    return (statistics.median(single) if single else 0.0), batch


def quantized_graph(source: Path, target: Path) -> str:
    """Write the int8 form of ``source`` to ``target`` with onnxruntime's dynamic quantization; "" when done, else
    why there is none. A MatMul on double weights (what the float64 conversions hold) is quantized through float32
    (cast in, quantize, cast out): onnxruntime quantizes float weights only."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    # The rewrite holds a few copies of the graph in this worker: bounded by the in-process memory cap.
    limit = settings.PORTAL_ONNX_MEMORY_MB * 1024 * 1024 // 4
    if source.stat().st_size > limit:
        return (f"the float form ({source.stat().st_size:,} bytes) is larger than a quarter of PORTAL_ONNX_MEMORY_MB, "
                "the most a worker quantizes")
    model = onnx.load_model_from_string(source.read_bytes())
    initializers = {i.name: i for i in model.graph.initializer}
    nodes: list[Any] = []
    for index, node in enumerate(model.graph.node):
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if node.domain in ("", "ai.onnx") and weight is not None and weight.data_type == TensorProto.DOUBLE:
            name = f"portal_int8_{index}"
            model.graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(weight).astype(np.float32), f"{name}_w"))
            nodes += [helper.make_node("Cast", [node.input[0]], [f"{name}_in"], to=TensorProto.FLOAT,
                                       name=f"{name}_cast_in"),
                      helper.make_node("MatMul", [f"{name}_in", f"{name}_w"], [f"{name}_out"], name=f"{name}_matmul"),
                      helper.make_node("Cast", [f"{name}_out"], [node.output[0]], to=TensorProto.DOUBLE,
                                       name=f"{name}_cast_out")]
        else:
            if not node.name:
                node.name = f"portal_node_{index}"
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.metadata_props[:]
    operators = sorted({n.op_type for n in model.graph.node})
    nothing = ("onnxruntime's dynamic quantization found nothing to quantize in this graph (it quantizes the weights "
               "of MatMul, convolutions and recurrent layers; this graph has " + ", ".join(operators[:12]) + ")")
    if not set(operators) & (set(IntegerOpsRegistry) - {"Gather", "Transpose"}):  # those two only follow others
        return nothing
    quantize_dynamic(model, str(target), weight_type=QuantType.QInt8)
    quantized = onnx.load_model_from_string(target.read_bytes())
    if not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "ConvInteger") for n in quantized.graph.node):
        target.unlink()
        return nothing
    used = {n.domain for n in quantized.graph.node} | {"", "ai.onnx"}
    kept = [o for o in quantized.opset_import if o.domain in used]
    del quantized.opset_import[:]
    quantized.opset_import.extend(kept)
    onnx.save(quantized, str(target))
    return ""


def int8_verdict(fp32: dict[str, Any], int8: dict[str, Any], agreement: float, relative_gap: float | None,
                 regression: bool) -> tuple[bool, str]:
    """Whether the int8 form stays within ``PORTAL_EDGE_INT8_TOLERANCE`` of the float form, and the sentence why."""
    tolerance = settings.PORTAL_EDGE_INT8_TOLERANCE
    if regression:
        if "mae" in fp32 and "mae" in int8:
            allowed = fp32["mae"] * (1 + tolerance) + 1e-12
            return int8["mae"] <= allowed, (f"MAE {int8['mae']:.6g} against the float form's {fp32['mae']:.6g} "
                                            f"(at most {tolerance:.1%} more allowed)")
        gap = relative_gap if relative_gap is not None else float("inf")
        return gap <= tolerance, (f"mean absolute difference from the float form's answers {gap:.3%} of their mean "
                                  f"magnitude (no true values in the reference; at most {tolerance:.1%} allowed)")
    if "accuracy" in fp32 and "accuracy" in int8:
        return fp32["accuracy"] - int8["accuracy"] <= tolerance + 1e-12, (
            f"accuracy {int8['accuracy']:.4f} against the float form's {fp32['accuracy']:.4f} (at most "
            f"{tolerance:.1%} lower allowed)")
    return 1 - agreement <= tolerance + 1e-12, (
        f"{1 - agreement:.3%} of its answers differ from the float form's (no true values in the reference; at most "
        f"{tolerance:.1%} allowed)")


def measure(path: Path, matrix: Any, truth: Any, *, quantized: bool) -> tuple[Any, Form]:
    try:
        predict = load_onnx_predictor(path, quantized=quantized)
    except (OnnxRefused, OnnxSandboxOnly) as exc:
        raise PackageRefused(f"the {'int8' if quantized else 'float'} form may not run in the portal: {exc}") from None
    predictions = _predict_all(predict, matrix)
    form = Form(name="int8" if quantized else "fp32", file="model.int8.onnx" if quantized else "model.onnx", path=path,
                metrics=form_metrics(predictions, truth))
    form.latency_ms_p50, form.latency_us_per_row_batch = _latency(predict, matrix)
    return predictions, form


def write_package(*, version: ModelVersion, package_uid: str, work: Path, forms: list[Form], columns: list[str],
                  example: dict[str, Any], proof: str, int8_note: str, missing_values: bool,
                  task: str) -> Built:
    """The package folder (forms, runner, public key, manifest, signature), zipped under one top folder."""
    top = f"{version.model.name}-v{version.number}-edge"
    root = work / "package" / top
    (root / "portal_edge").mkdir(parents=True)
    for form in forms:
        shutil.copyfile(form.path, root / form.file)
        form.path = root / form.file
    for source in sorted(RUNNER_SOURCE.glob("*.py")):
        shutil.copyfile(source, root / "portal_edge" / source.name)
    (root / "public_key.pem").write_text(signing.public_key_pem())
    (root / "README.txt").write_text(
        f"Edge package of {version.model.name} version {version.number}.\n\n"
        "Needs Python 3.10+ with onnxruntime and numpy (pip install onnxruntime numpy); nothing else.\n\n"
        "  python -m portal_edge verify --public-key portal-edge-key.pem   # signature and hashes, offline\n"
        "  python -m portal_edge rows.json                               # or rows.csv; predictions on stdout\n"
        "  python -m portal_edge upload --url https://PORTAL --token mle_…  # kept predictions, when online\n\n"
        "Run the commands from this folder. Predictions are kept in outbox/ until uploaded.\n")
    files = {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    form_rows = [f.as_dict() for f in forms]
    manifest = {
        "format": FORMAT, "package": package_uid, "model": version.model.name, "version": version.number,
        "version_sha256": version.artifact_sha256,
        "signature": version.signature, "columns": columns, "input_example": example, "task": task,
        "missing_values": missing_values, "forms": form_rows, "default_form": "fp32", "proof": proof,
        "int8": int8_note or "offered", "tolerance": settings.PORTAL_EDGE_INT8_TOLERANCE,
        "files": files, "key_fingerprint": signing.public_key_fingerprint(),
        "upload": {"path": "/api/v1/edge/uploads", "id": "32 hex characters per prediction, made on the device"},
    }
    raw = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    (root / "manifest.json").write_bytes(raw)
    (root / "manifest.json.sig").write_bytes(base64.b64encode(signing.sign(raw)) + b"\n")
    zip_path = work / f"{top}.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, f"{top}/{path.relative_to(root).as_posix()}")
    return Built(zip_path=zip_path, forms=form_rows, manifest=manifest, int8_note=int8_note)


def build(*, version: ModelVersion, package_uid: str, int8: bool, work: Path,
          step: Callable[[int, str], None]) -> Built:
    """Every step of a package but the database's: raises ``PackageRefused`` with the reason."""
    step(15, "Converting the version to ONNX in the sandbox and proving the conversion on the reference rows, the "
             "input example and the boundary probes.")
    float_path, prepared, proof = float_form(version, work)
    step(50, f"Float form: {proof}")
    reference, truth, columns = reference_rows(version, prepared)
    example = prepared.example if prepared is not None else _example(version)
    matrix = reference if reference is not None else np.asarray(example.rows, dtype=np.float64)
    fp32_predictions, fp32 = measure(float_path, matrix, truth, quantized=False)
    regression = _is_regression(fp32_predictions)
    forms = [fp32]
    note = ""
    if not int8:
        note = "not asked for"
    elif reference is None:
        note = "no reference data to measure an int8 form on, so none is offered"
    else:
        step(65, "Quantizing the float form to int8 with onnxruntime's dynamic quantization.")
        int8_path = work / "model.int8.onnx"
        try:
            note = quantized_graph(float_path, int8_path)
        except Exception as exc:  # the quantizer refuses graphs in many ways; the package then has no int8 form
            note = f"onnxruntime's dynamic quantization failed on this graph ({type(exc).__name__}: {str(exc)[:200]})"
        if not note:
            try:
                int8_predictions, int8_form = measure(int8_path, matrix, truth, quantized=True)
            except PackageRefused as exc:
                note = f"not offered: {exc}"
        if not note:
            agreement = float(np.mean(_same(int8_predictions, fp32_predictions))) if not regression else 1.0
            gap = None
            if regression:
                a, b = np.asarray(fp32_predictions, np.float64), np.asarray(int8_predictions, np.float64)
                gap = float(np.mean(np.abs(a - b)) / max(float(np.mean(np.abs(a))), 1e-12))
                int8_form.metrics["relative_gap_to_fp32"] = gap
            else:
                int8_form.metrics["agreement_with_fp32"] = agreement
            ok, why = int8_verdict(fp32.metrics, int8_form.metrics, agreement, gap, regression)
            if ok:
                int8_form.metrics["verdict"] = why
                forms.append(int8_form)
            else:
                note = f"not offered: on {len(matrix):,} reference rows its {why}"
        step(80, f"Int8 form: {note or 'offered, ' + forms[-1].metrics['verdict']}.")
    missing = bool(prepared.proof.missing_values) if prepared is not None and prepared.proof is not None else False
    built = write_package(version=version, package_uid=package_uid, work=work, forms=forms, columns=columns,
                          example=example.body, proof=proof, int8_note=note, missing_values=missing,
                          task="regression" if regression else "classification")
    step(90, "Manifest signed; package written.")
    return built
