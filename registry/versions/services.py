"""Writes of the registry: registering models, uploading versions, scanning verdicts, trust decisions, downloads.

Each records its audit event inside its own transaction. Uploads are judged statically *before* anything is
stored (a refused upload leaves nothing in storage); the sandboxed load and smoke test run afterwards in a worker.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import Max
from django.dispatch import Signal
from django.utils import timezone

from portal import context
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import AuditOutcome, Team
from portal.permissions import require_capability
from registry import hooks, sandbox, storage
from registry.models import (
    ALIAS_NAME_VALIDATOR,
    Blob,
    MlflowSource,
    ModelAlias,
    ModelVersion,
    ReferenceData,
    RegisteredModel,
    TeamTrustedType,
    TrustState,
    VersionStatus,
)
from registry.scanning.archive import extract_zip
from registry.scanning.findings import Finding, UploadRejected
from registry.scanning.inspect import CODE_PREFIX, inspect_upload, json_safe
from registry.versions import profiling

logger = logging.getLogger(__name__)
# Sent once the transaction that asks for a version's sandboxed check (scan_requested) or its global importance
# (explain_requested) commits, with ``version_id`` and ``request_ctx``: registry.versions.tasks enqueues the work.
scan_requested = Signal()
explain_requested = Signal()

_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._ -]")


def model_target(model: RegisteredModel) -> Target:
    return Target(type="registeredmodel", id=model.name, repr=model.name, team_slug=model.team.slug)


def version_target(version: ModelVersion) -> Target:
    return Target(type="modelversion", id=f"{version.model.name}/{version.number}", repr=str(version),
                  team_slug=version.model.team.slug)


def _display_filename(name: str) -> str:
    """The upload's name for display only: never used to name anything stored."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    return _SAFE_FILENAME.sub("_", base)[:200]


# --- Registering -----------------------------------------------------------------------------------------------

def model_register(*, name: str, team: Team, description: str = "", tags: list[str] | None = None,
                   actor: Any) -> RegisteredModel:
    require_capability(actor, "register_model")
    if not actor.has_perm("portal.view_all_teams") and not team.members.filter(pk=actor.pk).exists():
        raise PermissionDenied("You can register models only for teams you belong to.")
    tags = [str(t).strip()[:50] for t in (tags or []) if str(t).strip()][:20]
    with transaction.atomic():
        if RegisteredModel.objects.filter(name=name).exists():
            raise ValidationError({"name": f"A model named {name!r} already exists; pick another name."})
        model = RegisteredModel(name=name, team=team, description=description, tags=tags, created_by=actor)
        model.full_clean()
        model.save()
        audit_record(AuditAction.MODEL_REGISTER, actor=actor, target=model_target(model),
                     after={"name": name, "team": team.slug, "description": description, "tags": tags})
    return model


# --- Uploading -------------------------------------------------------------------------------------------------

@dataclass
class UploadMetadata:
    description: str = ""
    metrics: dict[str, float] | None = None
    params: dict[str, Any] | None = None
    mlflow_run_id: str = ""
    source: str = ""
    git_commit: str = ""
    training_data_hash: str = ""
    intended_use: str = ""
    limitations: str = ""
    ethical_considerations: str = ""
    sensitive_columns: dict[str, str] | None = None
    mlflow_source: dict[str, Any] | None = None  # an MlflowSource row's fields, written with the version
    trained_on: tuple[str, ...] = ()  # dataset snapshots (uids or SHA-256) the version was trained on


SENSITIVITY_KINDS = ("personal", "health")
TRAINED_ON_TAG = "portal.trained_on"  # an MLflow run tag naming the snapshots the run trained on


def split_references(raw: str) -> tuple[str, ...]:
    """``trained_on`` as typed: snapshot ids or hashes separated by commas or white space."""
    return tuple(part for part in re.split(r"[\s,]+", raw or "") if part)


def _json_object(value: Any, field: str, example: str) -> dict[str, Any]:
    """A JSON object given as a string (a form field) or already parsed; {} when empty."""
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValidationError({field: f"{field} is not valid JSON ({exc.msg} at character {exc.pos})."}) from None
    if not isinstance(value, dict):
        raise ValidationError({field: f"{field} must be a JSON object such as {example}."})
    return dict(json_safe(value))  # NaN (a metric MLflow logged as NaN) is stored as null, not refused by PostgreSQL


def validate_sensitive_columns(value: Any) -> dict[str, str]:
    """``{"column": "personal" | "health"}`` from a JSON string or an already parsed object."""
    value = _json_object(value, "sensitive_columns", '{"age": "personal", "diagnosis": "health"}')
    if len(value) > 1000:
        raise ValidationError({"sensitive_columns": "at most 1000 columns."})
    for key, kind in value.items():
        if not isinstance(key, str) or not key or len(key) > 200 or kind not in SENSITIVITY_KINDS:
            raise ValidationError({"sensitive_columns": f"column {key!r}: say \"personal\" or \"health\"."})
    return dict(value)


def validate_upload_metadata(*, metrics: Any, sensitive_columns: Any) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics and sensitive columns checked together: one ValidationError naming every problem of both."""
    problems: dict[str, list[str]] = {}
    clean_metrics: dict[str, float] = {}
    clean_sensitive: dict[str, str] = {}
    try:
        clean_metrics = validate_metrics(metrics)
    except ValidationError as exc:
        problems.update(exc.message_dict)
    try:
        clean_sensitive = validate_sensitive_columns(sensitive_columns)
    except ValidationError as exc:
        problems.update(exc.message_dict)
    if problems:
        raise ValidationError(problems)
    return clean_metrics, clean_sensitive


def _reference_columns(path: Path, fmt: str | None) -> list[str]:
    """The reference table's column names, read from its header (CSV) or schema (Parquet) without loading rows."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception:  # a damaged file is the profiler's to report, after the scan
            return []
    import csv

    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        return next(csv.reader(fh), [])


def _check_sensitive_columns(sensitive: dict[str, str], signature: dict[str, Any], reference_path: Path | None,
                             reference_format: str | None) -> None:
    """Sensitive columns must be inputs of the model: checked against the declared signature (MLflow, ONNX), else
    the reference data's columns. A file that declares neither is checked after the sandbox has loaded it."""
    if not sensitive:
        return
    declared = [str(c.get("name")) for c in (signature or {}).get("inputs") or [] if isinstance(c, dict)
                and c.get("name")]
    if declared:
        known, where = declared, "inputs of the model"
    elif reference_path is not None:
        known, where = _reference_columns(reference_path, reference_format), "columns of the reference data"
    else:
        return
    if not known:
        return
    unknown = sorted(set(sensitive) - set(known))
    if unknown:
        shown = ", ".join(known[:12]) + (f" and {len(known) - 12} more" if len(known) > 12 else "")
        raise ValidationError({"sensitive_columns": f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} "
                                                    f"not among the {where} ({shown}); nothing was stored."})


TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/=+ -]{0,49}$")
MAX_TAGS = 30


def validate_tags(value: Any) -> list[str]:
    """Tags from a list or a comma-separated string: each 1-50 characters of letters, digits, spaces and
    ``_.:/=+-`` starting with a letter or digit; at most 30; duplicates dropped, order kept. One ValidationError
    names every bad tag."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValidationError({"tags": "Give the tags as a list of strings, such as [\"pii\", \"team:risk\"]."})
    tags = list(dict.fromkeys(t.strip() for t in value if t.strip()))
    problems = [f"{t[:60]!r} is not a tag: use up to 50 letters, digits, spaces and _.:/=+-, starting with a letter "
                "or digit." for t in tags if not TAG_PATTERN.match(t)]
    if len(tags) > MAX_TAGS:
        problems.append(f"At most {MAX_TAGS} tags ({len(tags)} given).")
    if problems:
        raise ValidationError({"tags": problems})
    return tags


def model_tags_set(*, model: RegisteredModel, tags: Any, actor: Any) -> RegisteredModel:
    """Replace a model's tags (audited with before and after)."""
    return _tags_set(RegisteredModel.objects.select_related("team"), model.pk, tags, actor=actor,
                     action=AuditAction.MODEL_TAGS_CHANGE, target=model_target)


def version_tags_set(*, version: ModelVersion, tags: Any, actor: Any) -> ModelVersion:
    """Replace a version's tags (audited). Only the tags change: a version's file, metrics and lineage do not."""
    return _tags_set(ModelVersion.objects.select_related("model__team"), version.pk, tags, actor=actor,
                     action=AuditAction.VERSION_TAGS_CHANGE, target=version_target)


def _tags_set(queryset: Any, pk: int, tags: Any, *, actor: Any, action: AuditAction, target: Any) -> Any:
    require_capability(actor, "register_model")
    clean = validate_tags(tags)
    with transaction.atomic():
        locked = queryset.select_for_update().get(pk=pk)
        before = list(locked.tags or [])
        if before != clean:
            locked.tags = clean
            locked.save(update_fields=["tags"])
            audit_record(action, actor=actor, target=target(locked), before={"tags": before}, after={"tags": clean})
    return locked


def alias_set(*, model: RegisteredModel, name: str, version: ModelVersion, actor: Any) -> ModelAlias:
    """Point alias ``name`` of ``model`` at ``version`` (creating it, or moving it from the version it named), audited
    with before and after. MLflow's rules: one version per alias, any number of aliases per version."""
    require_capability(actor, "register_model")
    name = (name or "").strip().lstrip("@")
    ALIAS_NAME_VALIDATOR(name)
    if version.model_id != model.pk:
        raise ValidationError({"version": f"v{version.number} is not a version of {model.name}."})
    if version.status != VersionStatus.READY:
        raise ValidationError({"version": f"v{version.number} is {version.status}; an alias names a ready version."})
    with transaction.atomic():
        RegisteredModel.objects.select_for_update().get(pk=model.pk)  # aliases of one model change one at a time
        alias = ModelAlias.objects.filter(model=model, name=name).select_related("version").first()
        before = alias.version.number if alias else None
        if alias is None:
            alias = ModelAlias.objects.create(model=model, name=name, version=version, updated_by=actor)
        elif alias.version_id != version.pk:
            alias.version, alias.updated_by, alias.updated_at = version, actor, timezone.now()
            alias.save(update_fields=["version", "updated_by", "updated_at"])
        else:
            return alias
        audit_record(AuditAction.MODEL_ALIAS_SET, actor=actor, target=model_target(model),
                     before={"alias": name, "version": before}, after={"alias": name, "version": version.number})
    return alias


def alias_delete(*, model: RegisteredModel, name: str, actor: Any) -> None:
    require_capability(actor, "register_model")
    name = (name or "").strip().lstrip("@")
    with transaction.atomic():
        RegisteredModel.objects.select_for_update().get(pk=model.pk)
        alias = ModelAlias.objects.filter(model=model, name=name).select_related("version").first()
        if alias is None:
            raise ValidationError({"alias": f"{model.name} has no alias @{name}."})
        number = alias.version.number
        alias.delete()
        audit_record(AuditAction.MODEL_ALIAS_DELETE, actor=actor, target=model_target(model),
                     before={"alias": name, "version": number}, after={"alias": name, "version": None})


def validate_metrics(value: Any) -> dict[str, float]:
    """Metrics are a flat JSON object of finite numbers (from a string or an already parsed object)."""
    value = _json_object(value, "metrics", '{"accuracy": 0.93}')
    if len(value) > 200:
        raise ValidationError({"metrics": "at most 200 metrics."})
    clean: dict[str, float] = {}
    for key, number in value.items():
        if not isinstance(key, str) or not key or len(key) > 100:
            raise ValidationError({"metrics": "metric names are non-empty strings of at most 100 characters."})
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValidationError({"metrics": f"metric {key!r} must be a finite number."})
        clean[key] = float(number)
    return clean


def _reject_upload(*, model: RegisteredModel, filename: str, findings: list[Finding], actor: Any) -> None:
    with transaction.atomic():
        audit_record(AuditAction.VERSION_UPLOAD_REJECTED, actor=actor, target=model_target(model),
                     outcome=AuditOutcome.FAILURE,
                     metadata={"filename": filename, "findings": [f.as_dict() for f in findings]})


def _trust_for_team(team: Team, untrusted: list[str]) -> tuple[str, list[TeamTrustedType]]:
    """A team's standing decisions cover skops types; code an upload brings is decided for that upload alone."""
    if not untrusted:
        return TrustState.NOT_NEEDED, []
    if any(t.startswith(CODE_PREFIX) for t in untrusted):
        return TrustState.PENDING, []
    standing = list(TeamTrustedType.objects.filter(team=team, type_name__in=untrusted).select_related("decided_by"))
    if {s.type_name for s in standing} >= set(untrusted):
        return TrustState.TRUSTED, standing
    return TrustState.PENDING, standing


def version_upload(*, model: RegisteredModel, upload: UploadedFile, reference: UploadedFile | None = None,
                   meta: UploadMetadata, actor: Any) -> ModelVersion:
    """Judge, store and record an uploaded model file; the sandboxed check follows in a worker."""
    require_capability(actor, "register_model")
    filename = _display_filename(upload.name or "upload")
    path = Path(upload.temporary_file_path())  # type: ignore[attr-defined]
    sha256 = getattr(upload, "sha256", None) or storage.sha256_of_file(path)[0]
    reference_format = None
    if reference is not None:
        try:
            reference_format = profiling.sniff_table_format(Path(reference.temporary_file_path()))  # type: ignore[attr-defined]
        except profiling.ReferenceDataError as exc:
            raise ValidationError({"reference_data": str(exc)}) from None
    try:
        inspection = inspect_upload(path, filename)
    except UploadRejected as rejected:
        _reject_upload(model=model, filename=filename, findings=rejected.findings, actor=actor)
        raise
    trust_state, standing = _trust_for_team(model.team, inspection.untrusted_types)
    # Checked before anything is stored or numbered, so a mistyped column burns no version number.
    _check_sensitive_columns(meta.sensitive_columns or {}, inspection.signature,
                             Path(reference.temporary_file_path()) if reference is not None else None,  # type: ignore[attr-defined]
                             reference_format)
    # Lineage is checked before anything is stored too: another team's snapshot is refused with nothing written.
    trained_on = hooks.resolve_training_sets(model=model, references=list(meta.trained_on), actor=actor)

    blob = storage.blob_put(upload, sha256=sha256, size=upload.size or path.stat().st_size)
    ref_blob = None
    if reference is not None:
        ref_path = Path(reference.temporary_file_path())  # type: ignore[attr-defined]
        ref_sha, ref_size = (getattr(reference, "sha256", None), reference.size) if getattr(reference, "sha256", None) \
            else storage.sha256_of_file(ref_path)
        ref_blob = storage.blob_put(reference, sha256=str(ref_sha), size=int(ref_size or 0))

    with transaction.atomic():
        reference_row = (ReferenceData.objects.create(blob=ref_blob, format=reference_format or "csv")
                         if ref_blob is not None else None)
        locked = RegisteredModel.objects.select_for_update().get(pk=model.pk)
        number = (locked.versions.aggregate(n=Max("number"))["n"] or 0) + 1
        detail = "Scanning: loading the model in the sandbox."
        if trust_state == TrustState.PENDING:
            detail = ("Waiting for an approver to decide whether to trust these types: "
                      + ", ".join(inspection.untrusted_types))
        version = ModelVersion(
            model=locked, number=number, status=VersionStatus.SCANNING, status_detail=detail,
            artifact=blob, artifact_sha256=sha256, artifact_size=blob.size, original_filename=filename,
            format=inspection.format, flavors=inspection.flavors, signature=inspection.signature,
            input_example=inspection.input_example, metrics=meta.metrics or {}, params=meta.params or {},
            description=meta.description, uploaded_by=actor,
            mlflow_run_id=meta.mlflow_run_id or inspection.mlflow_run_id, source=meta.source,
            git_commit=meta.git_commit, training_data_hash=meta.training_data_hash,
            intended_use=meta.intended_use, limitations=meta.limitations,
            ethical_considerations=meta.ethical_considerations,
            sensitive_columns=meta.sensitive_columns or {},
            scan_findings=[f.as_dict() for f in inspection.findings],
            untrusted_types=inspection.untrusted_types, trust_state=trust_state,
            reference=reference_row,
        )
        if trust_state == TrustState.TRUSTED and standing:
            version.trust_decided_by = standing[0].decided_by
            version.trust_decided_at = max(s.decided_at for s in standing if s.decided_at)
            version.trust_reason = "Standing team decision: " + "; ".join(
                f"{s.type_name} trusted by {s.decided_by.get_username() if s.decided_by else 'a deleted user'} "
                f"({s.reason})" for s in standing)
        version.full_clean(exclude=["model", "artifact", "reference", "uploaded_by", "trust_decided_by"])
        version.save(force_insert=True)
        if meta.mlflow_source is not None:
            MlflowSource.objects.create(version=version, **meta.mlflow_source)
        hooks.record_training_sets(version=version, snapshots=trained_on, actor=actor)
        audit_record(
            AuditAction.VERSION_UPLOAD, actor=actor, target=version_target(version),
            after={"number": number, "sha256": sha256, "size": blob.size, "format": inspection.format,
                   "filename": filename, "untrusted_types": inspection.untrusted_types,
                   "trust_state": trust_state, "reference_sha256": reference_row.blob.sha256 if reference_row else None,
                   "metrics": version.metrics,
                   **({"mlflow": {k: meta.mlflow_source.get(k) for k in ("uri", "tracking_uri", "run_id")}}
                      if meta.mlflow_source is not None else {})},
        )
        if trust_state != TrustState.PENDING:
            _enqueue_scan(version)
    return version


def _enqueue_scan(version: ModelVersion) -> None:
    ctx = context.current().as_task_kwargs()
    transaction.on_commit(lambda: scan_requested.send(sender=ModelVersion, version_id=version.pk, request_ctx=ctx))


# --- The sandboxed check (run by a worker) ----------------------------------------------------------------------

def _sandbox_target(version: ModelVersion, artifact: Path, work: Path) -> tuple[str, Path]:
    if version.format == "mlflow":
        root = work / "model"
        extract_zip(artifact, root)
        mlmodels = [p for p in root.rglob("MLmodel") if len(p.relative_to(root).parts) <= 2]
        return "mlflow", mlmodels[0].parent
    suffix = {"skops": ".skops", "onnx": ".onnx", "pickle": ".pkl", "joblib": ".joblib"}[version.format]
    target = work / f"model{suffix}"
    target.symlink_to(artifact)
    return version.format, target


def _output_type(spec: dict[str, Any]) -> str:
    """A declared output's type as a column type: MLflow writes ``infer_signature(X, model.predict(X))``'s output
    as a tensor whose numpy dtype says what it holds (int64 labels, float64 values, object strings)."""
    if spec.get("type") != "tensor":
        return str(spec.get("type") or "")
    dtype = str((spec.get("tensor-spec") or {}).get("dtype") or "")
    for prefix, kind in (("int", "long"), ("uint", "long"), ("float", "double"), ("bool", "boolean"),
                         ("str", "string"), ("object", "string"), ("bytes", "binary")):
        if dtype.startswith(prefix):
            return kind
    return dtype


def _signature_problems(declared: dict[str, Any], observed: dict[str, Any]) -> list[str]:
    problems = []
    declared_out = declared.get("outputs") or []
    observed_out = observed.get("outputs") or []
    numeric = {"double", "float", "long", "integer"}
    if declared_out and observed_out and _output_type(declared_out[0]) and observed_out[0].get("type"):
        want, got = _output_type(declared_out[0]), observed_out[0]["type"]
        if want != got and not (want in numeric and got in numeric):
            problems.append(f"the signature says predictions are {want} but the model returned {got}")
    declared_inputs = [c for c in declared.get("inputs") or [] if isinstance(c, dict)]
    observed_in = [c["name"] for c in observed.get("inputs") or []]
    tensors = [c for c in declared_inputs if c.get("shape") or c.get("type") == "tensor"]
    if tensors:
        # A tensor signature (ONNX, MLflow tensor spec) names the tensor, not columns: compare widths instead.
        shape = tensors[0].get("shape") or (tensors[0].get("tensor-spec") or {}).get("shape") or []
        width = shape[1] if len(shape) > 1 and isinstance(shape[1], int) and shape[1] > 0 else None
        if width is not None and observed_in and width != len(observed_in):
            problems.append(f"the model takes {width} features but ran on {len(observed_in)}")
        return problems
    declared_in = [str(c["name"]) for c in declared_inputs if c.get("name")]
    if declared_in and observed_in and set(declared_in) != set(observed_in):
        missing = sorted(set(declared_in) - set(observed_in))[:5]
        problems.append(f"the model's inputs differ from its signature (missing: {missing})")
    return problems


def version_scan(*, version_id: int) -> ModelVersion:
    """Load the version in the sandbox, run its input example, check the output against the signature, profile
    the reference data, then mark it ready or rejected. Safe to run twice: a version no longer scanning is left."""
    version = ModelVersion.objects.select_related("model__team", "artifact", "reference__blob").get(pk=version_id)
    if version.status != VersionStatus.SCANNING or version.trust_state == TrustState.PENDING:
        return version
    findings = [Finding(**f) for f in version.scan_findings]
    report: dict[str, Any] = {}
    signature = dict(version.signature or {})
    example = version.input_example
    problems: list[str] = []
    reference_profile = None
    tmp_root = Path(settings.VAR_DIR) / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    try:
        assert version.artifact is not None
        with storage.verified_local_path(version.artifact) as artifact, \
                tempfile.TemporaryDirectory(prefix="scan-", dir=tmp_root) as tmp:
            fmt, target = _sandbox_target(version, artifact, Path(tmp))
            options: dict[str, Any] = {"trusted_types": version.untrusted_types if version.trust_state ==
                                       TrustState.TRUSTED else []}
            if example is not None and fmt != "mlflow":
                options["example"] = example
            if version.reference is not None:
                with storage.verified_local_path(version.reference.blob) as ref_path:
                    table = profiling.read_table(ref_path, version.reference.format)
                    reference_profile = profiling.profile_table(table)
                    if example is None and fmt != "mlflow":
                        head = table.slice(0, 5).to_pydict()
                        options["example"] = {"columns": list(head), "data": [list(r) for r in zip(*head.values(),
                                                                                                    strict=True)]}
            result = sandbox.smoke_test(fmt, target, options)
            report = {"ok": result.ok, "isolated_network": result.isolated_network,
                      **{k: v for k, v in result.data.items() if k != "ok"}}
            if not result.ok:
                problems.append(f"the model could not be loaded and run in the sandbox: {result.error}")
                if result.stderr_tail:
                    report["stderr_tail"] = result.stderr_tail[-1000:]
            else:
                observed = {"inputs": result.data.get("inputs", []), "outputs": result.data.get("outputs", [])}
                problems += _signature_problems(signature, observed)
                if not signature.get("inputs"):
                    # Inferred here, for monitoring and batch files: never a schema MLflow would enforce. Names
                    # neither the model nor its example gave (f0, f1…) are marked positional.
                    signature = {**observed, "inferred_by": "portal"}
                    if result.data.get("positional"):
                        signature["positional"] = True
                inputs = {c.get("name") for c in signature.get("inputs", []) if isinstance(c, dict)}
                unknown = sorted(set(version.sensitive_columns) - inputs)
                if unknown:
                    problems.append("columns marked sensitive are not inputs of the model: " + ", ".join(unknown))
                if example is None:
                    example = result.data.get("example")
    except sandbox.SandboxUnavailable as exc:
        # Not the model's fault: it stays scanning (nothing is lost) and says why; a worker with a sandbox can
        # check it later (the scan task is idempotent).
        logger.error("Version %s not checked: the model sandbox is unavailable (%s)", version.pk, exc)
        ModelVersion.objects.filter(pk=version.pk, status=VersionStatus.SCANNING).update(
            status_detail=f"Waiting: the model sandbox is unavailable on the scan worker ({exc})."[:1000])
        version.refresh_from_db()
        return version
    except storage.IntegrityError as exc:
        problems.append(str(exc))
    except UploadRejected as exc:
        problems.append(str(exc))
    except profiling.ReferenceDataError as exc:
        problems.append(f"reference data: {exc}")

    for problem in problems:
        findings.append(Finding("block", "sandbox_check", problem[:2000]))
    status = VersionStatus.REJECTED if problems else VersionStatus.READY
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if locked.status != VersionStatus.SCANNING:
            return locked
        locked.status = status
        locked.status_detail = ("Ready: loaded and ran its input example in the sandbox." if not problems
                                else "Rejected: " + problems[0][:500])
        locked.scan_findings = [f.as_dict() for f in findings]
        # What the sandbox and the model's files say may hold NaN or infinities: stored as valid JSON (null).
        locked.sandbox_report = json_safe(report)
        locked.signature = json_safe(signature)
        locked.input_example = json_safe(example)
        locked.scanned_at = timezone.now()
        # The global importance is a second sandbox run of up to PORTAL_EXPLAIN_GLOBAL_SECONDS: its own task, so
        # the version is ready (and deployable) without waiting for it.
        locked.explanation = {} if problems else {"pending": True} if locked.reference_id else {
            "error": "the version has no reference data to explain against"}
        locked.save(update_fields=["status", "status_detail", "scan_findings", "sandbox_report", "signature",
                                   "input_example", "scanned_at", "explanation"])
        if reference_profile is not None and locked.reference_id:
            ReferenceData.objects.filter(pk=locked.reference_id).update(profile=reference_profile,
                                                                        rows=reference_profile["rows"])
        audit_record(AuditAction.VERSION_SCAN_VERDICT, actor=None, target=version_target(locked),
                     outcome=AuditOutcome.SUCCESS if not problems else AuditOutcome.FAILURE,
                     before={"status": VersionStatus.SCANNING}, after={"status": status, "problems": problems})
    if problems:
        _release_rejected_artifact(locked)
    elif locked.explanation.get("pending"):
        _enqueue_explain(locked)
    return locked


def _enqueue_explain(version: ModelVersion) -> None:
    ctx = context.current().as_task_kwargs()
    transaction.on_commit(lambda: explain_requested.send(sender=ModelVersion, version_id=version.pk, request_ctx=ctx))


def version_explain(*, version_id: int) -> ModelVersion:
    """The version's SHAP global importance from its reference data, computed in the sandbox (the model is a
    program) after the scan made it ready, and stored on the version with its audit event. Idempotent: a version
    whose importance is no longer pending is left as it is. Never blocks the version: a model no explainer fits is
    stored as {"error": why}."""
    version = ModelVersion.objects.select_related("model__team", "artifact", "reference__blob").get(pk=version_id)
    if version.status != VersionStatus.READY or not (version.explanation or {}).get("pending"):
        return version
    tmp_root = Path(settings.VAR_DIR) / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    try:
        assert version.artifact is not None
        with storage.verified_local_path(version.artifact) as artifact, \
                tempfile.TemporaryDirectory(prefix="explain-", dir=tmp_root) as tmp:
            fmt, target = _sandbox_target(version, artifact, Path(tmp))
            explanation = _global_importance(version, fmt, target, dict(version.sandbox_report or {}), Path(tmp))
    except sandbox.SandboxUnavailable as exc:
        logger.error("Version %s not explained: the model sandbox is unavailable (%s)", version.pk, exc)
        explanation = {"error": f"the model sandbox was unavailable on the worker ({exc})"[:1000]}
    except (storage.IntegrityError, UploadRejected) as exc:
        explanation = {"error": str(exc)[:1000]}
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if not (locked.explanation or {}).get("pending"):
            return locked
        locked.explanation = json_safe(explanation)
        locked.save(update_fields=["explanation"])
        audit_record(AuditAction.VERSION_EXPLAINED, actor=None, target=version_target(locked),
                     outcome=AuditOutcome.FAILURE if explanation.get("error") else AuditOutcome.SUCCESS,
                     after={"method": explanation.get("method", ""), "approximate": bool(explanation.get("approximate")),
                            "error": str(explanation.get("error") or "")[:300]})
    return locked


def _reference_rows(version: ModelVersion, columns: list[str], positional: bool) -> tuple[Any, list[str], str]:
    """The version's reference data as float64 rows in the model's input order (by name, or the first columns for
    a model that takes its inputs by position): (matrix or None, the columns, why not)."""
    if version.reference is None:
        return None, columns, "the version has no reference data to explain against"
    with storage.verified_local_path(version.reference.blob) as path:
        table = profiling.read_table(path, version.reference.format)
    names = [str(n) for n in table.column_names]
    picked = names[:len(columns)] if positional else columns
    if not picked or any(c not in names for c in picked) or len(picked) != len(columns):
        return None, columns, "the reference data lacks some of the model's inputs"
    try:
        matrix = np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype("float64") for c in picked])
    except (TypeError, ValueError):
        return None, columns, "the reference data has inputs that are not numbers"
    return matrix, (columns if not positional else picked), ""


def _global_importance(version: ModelVersion, fmt: str, target: Path, smoke: dict[str, Any],
                       work: Path) -> dict[str, Any]:
    """SHAP global importance from the reference data, computed in the sandbox (the model is a program). Never
    blocks the version: a model no explainer fits, or no reference data, is stored as {"error": why}."""
    columns = [str(c.get("name")) for c in smoke.get("inputs") or [] if isinstance(c, dict)]
    try:
        matrix, names, why = _reference_rows(version, columns, bool(smoke.get("positional")))
    except (profiling.ReferenceDataError, storage.IntegrityError) as exc:
        matrix, names, why = None, columns, f"the reference data could not be read ({exc})"
    if matrix is None:
        return {"error": why}
    if fmt == "mlflow":
        bundle = target  # the unpacked MLflow model folder, a private copy in the scan's own folder
    else:
        bundle = work / "explain"
        bundle.mkdir()
        source = target.resolve()
        try:
            os.link(source, bundle / f"model.{fmt}")
        except OSError:
            shutil.copyfile(source, bundle / f"model.{fmt}")
    np.save(bundle / "portal-reference.npy", matrix, allow_pickle=False)
    budget = settings.PORTAL_EXPLAIN_GLOBAL_SECONDS
    options = {"columns": names, "reference": "portal-reference.npy",
               "trusted_types": version.untrusted_types if version.trust_state == TrustState.TRUSTED else []}
    result = sandbox.global_importance(fmt, bundle, options, budget_seconds=budget)
    if not result.ok:
        return {"error": (result.error or "the explainer failed in the sandbox")[:1000],
                "no_explainer": bool(result.data.get("no_explainer"))}
    data = {k: v for k, v in result.data.items() if k != "ok"}
    data["computed_at"] = timezone.now().isoformat()
    return data


def _release_rejected_artifact(version: ModelVersion) -> None:
    """A rejected version keeps its record (and its hash) for the audit trail, but not the bytes."""
    blob: Blob | None = version.artifact
    if blob is None:
        return
    with transaction.atomic():
        version.artifact = None
        version.save(update_fields=["artifact"])
    storage.blob_delete_if_unused(blob)


# --- Trust decisions -------------------------------------------------------------------------------------------

def version_trust_decide(*, version: ModelVersion, trust: bool, reason: str, remember_for_team: bool = False,
                         actor: Any) -> ModelVersion:
    """An approver's explicit decision on a version's untrusted skops types (never the uploader's own)."""
    require_capability(actor, "decide_trust")
    reason = (reason or "").strip()
    if len(reason) < 10:
        raise ValidationError({"reason": "Explain the decision in at least 10 characters; it is kept in the audit trail."})
    if version.uploaded_by_id == actor.pk:
        raise PermissionDenied("You uploaded this version, so someone else must decide whether to trust it.")
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().select_related("model__team").get(pk=version.pk)
        if locked.trust_state != TrustState.PENDING:
            raise ValidationError({"trust": f"This version's trust is already {locked.get_trust_state_display().lower()}."})
        locked.trust_state = TrustState.TRUSTED if trust else TrustState.REFUSED
        locked.trust_decided_by = actor
        locked.trust_decided_at = timezone.now()
        locked.trust_reason = reason
        fields = ["trust_state", "trust_decided_by", "trust_decided_at", "trust_reason"]
        if trust:
            locked.status_detail = "Scanning: loading the model in the sandbox."
        else:
            locked.status = VersionStatus.REJECTED
            locked.status_detail = f"Rejected: {actor.get_username()} refused to trust {', '.join(locked.untrusted_types)}."
            fields += ["status"]
        locked.save(update_fields=[*fields, "status_detail"])
        audit_record(AuditAction.VERSION_TRUST_DECISION, actor=actor, target=version_target(locked),
                     before={"trust_state": TrustState.PENDING},
                     after={"trust_state": locked.trust_state, "types": locked.untrusted_types, "reason": reason,
                            "remember_for_team": remember_for_team and trust})
        if trust and remember_for_team:
            for type_name in [t for t in locked.untrusted_types if not t.startswith(CODE_PREFIX)]:
                _, created = TeamTrustedType.objects.get_or_create(
                    team=locked.model.team, type_name=type_name, defaults={"decided_by": actor, "reason": reason})
                if created:
                    audit_record(AuditAction.TEAM_TRUSTED_TYPE_ADD, actor=actor,
                                 target=Target("team", locked.model.team.slug, locked.model.team.name,
                                               locked.model.team.slug),
                                 after={"type": type_name, "reason": reason})
        if trust:
            _enqueue_scan(locked)
    if not trust:
        _release_rejected_artifact(locked)
    return locked


def team_trust_type(*, team: Team, type_name: str, reason: str, actor: Any) -> TeamTrustedType:
    """A standing decision to trust one skops type for all of a team's future uploads."""
    require_capability(actor, "decide_trust")
    if len((reason or "").strip()) < 10:
        raise ValidationError({"reason": "Explain the decision in at least 10 characters."})
    with transaction.atomic():
        row, created = TeamTrustedType.objects.get_or_create(team=team, type_name=type_name,
                                                             defaults={"decided_by": actor, "reason": reason})
        if created:
            audit_record(AuditAction.TEAM_TRUSTED_TYPE_ADD, actor=actor,
                         target=Target("team", team.slug, team.name, team.slug),
                         after={"type": type_name, "reason": reason})
    return row


# --- Reads that are audited -----------------------------------------------------------------------------------

def version_download_record(*, version: ModelVersion, actor: Any) -> None:
    require_capability(actor, "download_artifact")
    with transaction.atomic():
        audit_record(AuditAction.VERSION_DOWNLOAD, actor=actor, target=version_target(version),
                     metadata={"sha256": version.artifact_sha256})


def reference_download_record(*, version: ModelVersion, actor: Any) -> None:
    require_capability(actor, "download_artifact")
    with transaction.atomic():
        audit_record(AuditAction.REFERENCE_DOWNLOAD, actor=actor, target=version_target(version),
                     metadata={"sha256": version.reference.blob.sha256 if version.reference else None})
