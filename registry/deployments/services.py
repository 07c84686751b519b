"""Deployments: putting a ready version live in an environment without downtime.

A deployment is a row a worker carries out in steps, each logged with its progress: claim, verify the artifact's
hash, prepare the serving form (ONNX converted and checked in the sandbox, or the vetted native file), warm it and
run the input example against the signature, then switch the environment's traffic in one transaction. Until that
last step nothing that serves changes, so a failed deployment leaves the environment as it was.

Retries are safe: a task redelivered after its worker died finds the row ``running``, claims it again (up to
``Deployment.MAX_ATTEMPTS``) and repeats the steps, which are idempotent; past that it fails with a reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.dispatch import Signal
from django.utils import timezone

from portal import context
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import AuditOutcome
from portal.permissions import require_capability
from portal.tasks import TRANSIENT_ERRORS
from registry import sandbox, storage
from registry.models import (
    Deployment,
    DeploymentStatus,
    Environment,
    EnvironmentState,
    ModelVersion,
    ServingInterval,
    ServingMode,
    Strategy,
    TrustState,
    VersionStatus,
)
from registry.sandbox.hosts import HostModelError, HostUnavailable
from registry.scanning.archive import extract_zip
from registry.scanning.onnxgraph import OnnxRefused, OnnxReview, review_onnx
from registry.serving.call_examples import example_rows
from registry.serving.runtime import inferred_signature, load_onnx_predictor, load_serving_model
from registry.versions import profiling
from registry.versions.selectors import environment_param

logger = logging.getLogger(__name__)

# Events for the features above deployments (promotions listen; imports point promotions -> deployments only).
# deployment_gates(deployment=): sent when a promotion's deployment starts; each receiver returns a list of problems
# (gates that no longer pass), and any problem fails the deployment before it is prepared.
deployment_gates = Signal()
# deployment_finished(deployment=, live=, error=): sent inside the transaction that makes a deployment live or failed,
# so what a receiver records commits with it.
deployment_finished = Signal()
# deployment_requested(deployment_id=, request_ctx=): sent once the transaction that creates a deployment commits;
# registry.deployments.tasks enqueues its run.
deployment_requested = Signal()


class DeploymentFailed(Exception):
    pass


def deployment_target(deployment: Deployment) -> Target:
    return Target(type="deployment", id=str(deployment.uid),
                  repr=f"{deployment.model.name} v{deployment.version.number} to {deployment.environment}",
                  team_slug=deployment.model.team.slug)


def _check_request(version: ModelVersion, environment: str, strategy: str, traffic_percent: int) -> None:
    environment_param(environment)
    if strategy not in Strategy.values:
        raise ValidationError({"strategy": "Use replace, canary or shadow."})
    if strategy == Strategy.CANARY and not 1 <= traffic_percent <= 99:
        raise ValidationError({"traffic_percent": "A canary takes between 1 and 99 percent of the traffic."})
    if version.status != VersionStatus.READY:
        raise ValidationError({"version": f"Version {version.number} is {version.status}; only ready versions deploy."})
    if strategy != Strategy.REPLACE:
        state = EnvironmentState.objects.filter(model=version.model, environment=environment).first()
        if state is None or state.champion_id is None:
            raise ValidationError({"strategy": f"Nothing serves {environment} yet: deploy with replace first."})


def deployment_start(*, version: ModelVersion, environment: str, strategy: str = Strategy.REPLACE,
                     traffic_percent: int = 100, actor: Any, reason: str = "",
                     via_promotion: bool = False, purpose: str = "deploy") -> Deployment:
    """Create a deployment and hand it to a worker. Data scientists deploy to dev; stage and prod are reached only
    through promotion (which calls this with ``via_promotion=True``)."""
    if not via_promotion:
        if environment != Environment.DEV:
            raise PermissionDenied(f"{environment} is reached only through promotion, with approval.")
        require_capability(actor, "deploy_dev")
    _check_request(version, environment, strategy, traffic_percent)
    percent = 100 if strategy == Strategy.REPLACE else traffic_percent
    with transaction.atomic():
        deployment = Deployment.objects.create(
            model=version.model, version=version, environment=environment, strategy=strategy,
            traffic_percent=percent, requested_by=actor if getattr(actor, "is_authenticated", False) else None,
            request_id=context.current().request_id, reason=reason, purpose=purpose,
            log=[_entry({"promotion": "Deployment requested by an approved promotion.",
                         "rollback": "Rollback requested."}.get(purpose, "Deployment requested."))],
        )
        audit_record(AuditAction.DEPLOYMENT_CREATE, actor=actor, target=deployment_target(deployment),
                     after={"version": version.number, "environment": environment, "strategy": strategy,
                            "traffic_percent": percent, "purpose": purpose})
        ctx = context.current().as_task_kwargs()
        transaction.on_commit(lambda: deployment_requested.send(sender=Deployment, deployment_id=deployment.pk,
                                                                request_ctx=ctx))
    return deployment


def _entry(message: str) -> dict[str, str]:
    return {"at": timezone.now().isoformat(timespec="seconds"), "message": message}


def _step(deployment: Deployment, progress: int, message: str) -> None:
    deployment.progress = progress
    deployment.log = [*deployment.log, _entry(message)]
    Deployment.objects.filter(pk=deployment.pk).update(progress=progress, log=deployment.log)


def _claim(deployment_id: int) -> Deployment | None:
    """Take the deployment for this worker: pending, or running when a redelivered task finds its worker died."""
    claimable = Q(status=DeploymentStatus.PENDING) | Q(status=DeploymentStatus.RUNNING)
    claimed = Deployment.objects.filter(claimable, pk=deployment_id, attempts__lt=Deployment.MAX_ATTEMPTS).update(
        status=DeploymentStatus.RUNNING, attempts=F("attempts") + 1, started_at=timezone.now())
    if not claimed:
        return None
    return Deployment.objects.select_related("model__team", "version__artifact").get(pk=deployment_id)


def _example(version: ModelVersion) -> Any:
    """The version's input example as a request carries it (``call_examples.example_rows``: the environment page
    shows the same rows): columns in the signature's order, or tensor rows without names."""
    example = example_rows(version, limit=20)
    if example.source != "example" or not example.rows:
        raise DeploymentFailed("the version has no input example with its signature's inputs to validate against")
    return example


def _prepare(deployment: Deployment, work: Path) -> tuple[str, Any]:
    """The serving form: ('onnx', Blob) only when the portal has proven, in its own process, that the sandbox's
    ONNX conversion predicts exactly what the model predicts (``_prove``); else the sandboxed host serves the
    model itself: ('mlflow', None) with MLflow's own scoring code, ('native', None) for other files."""
    version = deployment.version
    assert version.artifact is not None
    if version.format == "onnx":
        return _uploaded_onnx_form(deployment)
    if version.format == "mlflow" and inferred_signature(version):
        _step(deployment, 45, "Serving with MLflow's own scoring code in a sandboxed model host: the model has no "
                              "signature, so requests reach it as `mlflow models serve` passes them (positional "
                              "inputs, their own column names), never under names the portal inferred.")
        return "mlflow", None
    prepared = proven_onnx_form(version, work)
    if prepared.path is not None and prepared.proof is not None:
        _step(deployment, 45, f"Serving in-process with ONNX, {prepared.proof.form}: {prepared.proof.summary()}."
                              + (f" {prepared.note}" if prepared.note else ""))
        return "onnx", storage.blob_put_path(prepared.path)
    if version.format == "mlflow":
        _step(deployment, 45, f"Serving with MLflow's own scoring code in a sandboxed model host ({prepared.reason}).")
        return "mlflow", None
    _step(deployment, 45, f"Serving from a sandboxed model host: {prepared.reason}.")
    return "native", None


@dataclass
class PreparedForm:
    """What ``proven_onnx_form`` found: ``path`` (the stamped ONNX file in the work folder) and its ``proof`` when
    the conversion was proven; else ``reason`` says why there is no in-process form."""

    path: Path | None = None
    proof: Proof | None = None
    reason: str = ""
    note: str = ""  # about the reference rows (sampled, or not used)
    reference: Any = None  # the reference rows the proof compared (float64, serving order), or None
    example: Any = None  # the version's input example (``call_examples.example_rows``)


def proven_onnx_form(version: ModelVersion, work: Path) -> PreparedForm:
    """Convert a version (not an ONNX upload) to ONNX in the sandbox and prove the conversion here, on the version's
    reference rows, its input example and the sandbox's boundary probes: the form deployments serve in-process and
    edge packages carry. Raises ``DeploymentFailed`` when the sandbox cannot run or fails outright."""
    assert version.artifact is not None
    example = _example(version)
    reference, reference_note = _reference_matrix(version, example.columns, len(example.rows[0]))
    with storage.verified_local_path(version.artifact) as artifact:
        if version.format == "mlflow":
            target = work / "model"
            extract_zip(artifact, target)
            mlmodels = [p for p in target.rglob("MLmodel") if len(p.relative_to(target).parts) <= 2]
            path = mlmodels[0].parent
            bundle = path
        else:
            # The model and the reference rows travel together in the sandbox's one read-only mount.
            bundle = path = work / "bundle"
            path.mkdir()
            try:
                os.link(artifact, path / f"model.{version.format}")
            except OSError:
                shutil.copyfile(artifact, path / f"model.{version.format}")
        options: dict[str, Any] = {"columns": example.columns, "rows": example.rows,
                                   "trusted_types": version.untrusted_types
                                   if version.trust_state == TrustState.TRUSTED else []}
        if reference is not None:
            np.save(bundle / REFERENCE_FILE, reference, allow_pickle=False)
            options["reference"] = REFERENCE_FILE
        out = work / "out"
        out.mkdir()
        output = out / "serving.onnx"
        try:
            result = sandbox.prepare_serving(version.format, path, options, out=out)
        except sandbox.SandboxUnavailable as exc:
            raise DeploymentFailed(f"the model sandbox is unavailable on this worker: {exc}") from None
    if not result.ok:
        raise DeploymentFailed(f"preparing the serving form failed: {result.error}")
    prepared = PreparedForm(reason=str(result.data.get("reason") or "no ONNX form"), note=reference_note,
                            reference=reference, example=example)
    if result.data.get("kind") == "onnx" and output.is_file() and not output.is_symlink():
        # What the sandbox wrote is the claim of a process that loaded the model: checked here, by the portal,
        # before anything credentialed loads it, then proven on the reference rows and probes before it is kept.
        review = _review_onnx_file(output, "the sandbox's ONNX form")
        if review.sandbox_reasons:
            prepared.reason = "its ONNX form uses " + "; ".join(review.sandbox_reasons)
        else:
            proof = _prove(output, out, result.data, reference=reference, example=example.rows)
            if proof.passed:
                _stamp(output, proof)
                prepared.path, prepared.proof = output, proof
                return prepared
            prepared.reason = f"the ONNX conversion ({proof.form}) was not proven: {proof.summary()}"
            if reference_note:
                prepared.reason += f". {reference_note}"
    return prepared


REFERENCE_FILE = "portal-reference.npy"
PROBES_FILE = "probes.npy"
NATIVE_FILE = "native.npy"
MAX_REFERENCE_ROWS = 50_000
MAX_PROOF_ROWS = 200_000
RELATIVE_TOLERANCE = 1e-9
ABSOLUTE_TOLERANCE = 1e-12  # two answers this close to zero are the same answer


def _reference_matrix(version: ModelVersion, columns: list[str], width: int) -> tuple[Any, str]:
    """The version's reference data as float64 rows in the serving order (the signature's columns, or the first
    ``width`` columns for an unnamed tensor), at most ``MAX_REFERENCE_ROWS`` of them (an even sample past that);
    (None, why) when there is none the fast path could take."""
    if version.reference is None:
        return None, ""
    try:
        with storage.verified_local_path(version.reference.blob) as path:
            table = profiling.read_table(path, version.reference.format)
    except (profiling.ReferenceDataError, storage.IntegrityError) as exc:
        return None, f"The reference data was not used ({exc})."
    names = [str(n) for n in table.column_names]
    picked = columns if columns else names[:width]
    if any(c not in names for c in picked) or len(picked) != width:
        return None, "The reference data lacks some of the model's inputs, so it was not used."
    try:
        matrix = np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype("float64")
                                  for c in picked])
    except (TypeError, ValueError):
        return None, "The reference data has inputs that are not numbers, so it was not used."
    if len(matrix) > MAX_REFERENCE_ROWS:
        keep = np.linspace(0, len(matrix) - 1, MAX_REFERENCE_ROWS).astype(int)
        return matrix[keep], f"{MAX_REFERENCE_ROWS:,} of the {len(matrix):,} reference rows were compared."
    return matrix, ""


@dataclass
class Proof:
    """The fast path's evidence: the model's own predictions (from the sandbox) against the ONNX form's (computed
    here), row by row."""

    form: str
    rows: int = 0
    reference_rows: int = 0
    example_rows: int = 0
    probes: int = 0
    probe_kind: str = ""
    probe_info: dict[str, Any] = field(default_factory=dict)
    mismatches: int = 0
    max_deviation: float = 0.0
    first_mismatch: str = ""
    refusal: str = ""  # why no comparison could be made at all
    missing_values: bool = False
    empty_rows: str = "refuses"  # the sandbox's word on what the model does with no rows (``answers`` or ``refuses``)

    @property
    def passed(self) -> bool:
        return not self.refusal and self.rows > 0 and self.mismatches == 0

    def summary(self) -> str:
        if self.refusal:
            return self.refusal
        info = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in self.probe_info.items() if isinstance(v, int))
        text = (f"{self.rows:,} rows compared ({self.reference_rows:,} reference, {self.example_rows:,} example, "
                f"{self.probes:,} {self.probe_kind}{f': {info}' if info else ''}"
                f"{', missing values included' if self.missing_values else ''}), {self.mismatches:,} mismatches, "
                f"max relative deviation {self.max_deviation:.3g}")
        return text + (f"; first mismatch: {self.first_mismatch}" if self.first_mismatch else "")


def _prove(output: Path, out: Path, report: dict[str, Any], *, reference: Any, example: list[list[Any]]) -> Proof:
    """Run the ONNX form in this process on the sandbox's probe rows and compare with the model's own predictions.
    The files come from an untrusted process: read without pickle, bounded, and the reference rows at their head
    must be the portal's own (so the probes cannot leave them out)."""
    proof = Proof(form=str(report.get("form") or "the ONNX conversion")[:200],
                  probe_kind=str(report.get("probe_kind") or "probes")[:60],
                  probe_info={str(k)[:40]: v for k, v in dict(report.get("probe_info") or {}).items()
                              if isinstance(v, int)},
                  empty_rows="answers" if report.get("empty_rows") == "answers" else "refuses")
    try:
        inputs = np.load(out / PROBES_FILE, allow_pickle=False, mmap_mode="r")
        native = np.load(out / NATIVE_FILE, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        proof.refusal = f"the sandbox's probe files could not be read ({type(exc).__name__})"
        return proof
    width = len(example[0]) if example else 0
    if inputs.dtype != np.float64 or inputs.ndim != 2 or inputs.shape[1] != width or not 0 < len(inputs) \
            <= MAX_PROOF_ROWS or native.ndim != 1 or len(native) != len(inputs) or native.dtype.kind not in "biufU":
        proof.refusal = "the sandbox's probe files do not have the expected shape"
        return proof
    inputs, native = np.array(inputs), np.array(native)
    n_reference = 0 if reference is None else len(reference)
    head = np.asarray(example, dtype="float64")
    expected = head if reference is None else np.concatenate([reference, head])
    if not np.array_equal(inputs[: len(expected)], expected, equal_nan=True):
        proof.refusal = "the sandbox did not compare the reference and example rows it was given"
        return proof
    try:
        predict = load_onnx_predictor(output)
        answers = np.concatenate([np.asarray(predict(inputs[i:i + 20_000])).reshape(len(inputs[i:i + 20_000]), -1)
                                  for i in range(0, len(inputs), 20_000)])
    except Exception as exc:  # onnxruntime refuses a graph or an input in many ways; the host then serves
        proof.refusal = f"the ONNX form failed on the rows it was to be proven on ({type(exc).__name__})"
        return proof
    proof.rows, proof.reference_rows, proof.example_rows = len(inputs), n_reference, len(head)
    proof.probes = len(inputs) - len(expected)
    proof.missing_values = bool(np.isnan(inputs).any())
    if answers.shape[1] != 1:
        proof.refusal = f"the ONNX form answers {answers.shape[1]} values per row where the model answers one"
        return proof
    mismatched, deviation = compare_predictions(native, answers.ravel())
    proof.mismatches, proof.max_deviation = int(mismatched.sum()), deviation
    if proof.mismatches:
        i = int(np.flatnonzero(mismatched)[0])
        proof.first_mismatch = (f"row {inputs[i].tolist()[:8]} ({_row_origin(i, n_reference, len(head))}): the "
                                f"model predicts {native[i].item()!r}, ONNX {answers.ravel()[i].item()!r}")
    return proof


def _row_origin(i: int, n_reference: int, n_example: int) -> str:
    if i < n_reference:
        return f"reference row {i}"
    return f"example row {i - n_reference}" if i < n_reference + n_example else "a probe"


def compare_predictions(native: Any, candidate: Any) -> tuple[Any, float]:
    """(which rows differ, the largest relative deviation between numbers): labels must be equal, numbers
    within ``RELATIVE_TOLERANCE`` of each other (or ``ABSOLUTE_TOLERANCE`` near zero; both missing is equal)."""
    native, candidate = np.asarray(native), np.asarray(candidate)
    if native.dtype.kind == "f" and candidate.dtype.kind in "iuf":
        a, b = native.astype("float64"), candidate.astype("float64")
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            scale = np.maximum(np.abs(a), np.abs(b))
            gap = np.abs(a - b)
            deviation = np.where(a == b, 0.0, gap / np.where(scale > 0, scale, 1.0))
            mismatched = np.where(a == b, False, ~(gap <= np.maximum(RELATIVE_TOLERANCE * scale, ABSOLUTE_TOLERANCE)))
        mismatched = np.where(nan_a & nan_b, False, mismatched | (nan_a ^ nan_b))
        deviation = np.where(nan_a & nan_b, 0.0, np.where(np.isnan(deviation), np.inf, deviation))
        return mismatched, float(deviation.max(initial=0.0))
    if native.dtype.kind in "U" or candidate.dtype.kind in "OUS":
        return np.asarray([x != y for x, y in zip(native.tolist(), candidate.tolist(), strict=True)]), 0.0
    return native != candidate, 0.0


def _stamp(output: Path, proof: Proof) -> None:
    """Record in the ONNX file what the proof covered: web workers let missing values through only to a form
    proven on them."""
    import onnx

    model = onnx.load(str(output), load_external_data=False)
    del model.metadata_props[:]
    for key, value in (("portal.missing_values", "true" if proof.missing_values else "false"),
                       ("portal.empty_rows", proof.empty_rows), ("portal.proof", proof.summary()[:2000])):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(output))


def _review_onnx_file(path: Path, what: str) -> OnnxReview:
    """The portal's own review of an ONNX file (``registry.scanning.onnxgraph``): a deployment whose graph keeps
    any tensor's data in another file is refused here, naming the tensor, before any credentialed process loads it."""
    try:
        review = review_onnx(path.read_bytes())
    except OnnxRefused as exc:
        raise DeploymentFailed(f"{what} cannot be served: {exc}") from None
    if review.refusal:
        raise DeploymentFailed(f"{what} cannot be served: {review.refusal}")
    return review


def _uploaded_onnx_form(deployment: Deployment) -> tuple[str, Any]:
    """An uploaded ONNX graph: in the web workers when it holds only what the converters emit; else (control flow,
    operators sized by input values, custom operators) in a sandboxed model host, said in the deployment's log,
    or refused where no sandbox can start."""
    version = deployment.version
    assert version.artifact is not None
    with storage.verified_local_path(version.artifact) as path:
        review = _review_onnx_file(path, "the uploaded ONNX graph")
    if not review.sandbox_reasons:
        _step(deployment, 45, "Serving the uploaded ONNX graph itself in-process (no external data, only operators "
                              "the converters emit): there is no other form to agree with.")
        return "onnx", version.artifact
    why = "; ".join(review.sandbox_reasons)
    unavailable = sandbox.unavailable_reason()
    if unavailable:
        raise DeploymentFailed(f"the ONNX graph uses {why}, which the web workers do not run in-process; it needs a "
                               f"sandboxed model host, and none can start here ({unavailable})")
    _step(deployment, 45, f"Serving from a sandboxed model host: the ONNX graph uses {why}, which the web workers "
                          "do not run in-process.")
    return "native", None


def _warm_and_validate(deployment: Deployment, kind: str, blob: Any) -> None:
    """Load the serving form as a web worker will, and check the input example's output against the signature."""
    version = deployment.version
    loaded = load_serving_model(version=version, kind=kind, blob=blob)
    example = _example(version)
    rows = example.rows
    import numpy as np

    try:
        if loaded.answers_requests:
            import orjson

            body = orjson.dumps(example.body)
            answer = loaded.invoke(body, "application/json")
            if answer.status != 200:
                raise DeploymentFailed(f"MLflow's scoring code refused the input example ({answer.status}): "
                                       f"{answer.body[:500]}")
            predictions = orjson.loads(answer.body).get("predictions")
            if not isinstance(predictions, list):
                predictions = [predictions]
            if predictions and isinstance(predictions[0], dict):
                return  # a frame of outputs per row: MLflow's own encoding, nothing to compare
            predictions = np.asarray(predictions).ravel().tolist()
        else:
            predictions = loaded.predict(np.asarray(rows, dtype="float64"), example.columns or None)
    except (HostUnavailable, HostModelError) as exc:
        raise DeploymentFailed(f"the model host could not answer the input example: {exc}") from None
    finally:
        loaded.close()
    if len(predictions) != len(rows):
        raise DeploymentFailed(f"{len(rows)} example rows gave {len(predictions)} predictions")
    expected = (version.sandbox_report or {}).get("predictions")
    if expected and [p for p in predictions[: len(expected)]] != expected[: len(predictions)]:
        raise DeploymentFailed(f"the serving form predicted {predictions[:5]} where the sandbox saw {expected[:5]}")


def deployment_run(*, deployment_id: int) -> Deployment | None:
    deployment = _claim(deployment_id)
    if deployment is None:
        current = Deployment.objects.filter(pk=deployment_id).first()
        if current and current.status == DeploymentStatus.RUNNING and current.attempts >= Deployment.MAX_ATTEMPTS:
            _fail(current, f"gave up after {current.attempts} attempts: the worker carrying it out kept dying")
        return current
    if deployment.attempts > 1:
        _step(deployment, 5, f"Attempt {deployment.attempts}: the previous worker stopped; starting over.")
    try:
        _step(deployment, 10, "Claimed by a worker; verifying the artifact's SHA-256.")
        version = deployment.version
        if version.status != VersionStatus.READY or version.artifact is None:
            raise DeploymentFailed(f"version {version.number} is no longer ready")
        if deployment.purpose == "promotion":
            problems: list[str] = []
            for _receiver, found in deployment_gates.send(sender=Deployment, deployment=deployment):
                problems += cast("list[str]", found)
            if problems:
                raise DeploymentFailed("a gate no longer passes: " + "; ".join(problems))
            _step(deployment, 20, "The promotion's gates still pass.")
        with storage.verified_local_path(version.artifact):
            pass
        _step(deployment, 30, "Artifact verified; preparing the serving form.")
        tmp_root = Path(settings.VAR_DIR) / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="deploy-", dir=tmp_root) as tmp:
            kind, blob = _prepare(deployment, Path(tmp))
        Deployment.objects.filter(pk=deployment.pk).update(serving_kind=kind, serving_blob=blob)
        deployment.serving_kind, deployment.serving_blob = kind, blob
        _step(deployment, 60, f"Serving form ready ({kind}); warming it and running the input example.")
        _warm_and_validate(deployment, kind, blob)
        _step(deployment, 85, "Input example answered as the signature says; switching traffic.")
        _switch(deployment)
    except (DeploymentFailed, storage.IntegrityError, OSError, ValueError) as exc:
        logger.warning("Deployment %s failed: %s", deployment.uid, exc)
        _fail(deployment, str(exc))
    except TRANSIENT_ERRORS:
        raise  # the database or the broker is briefly away: the task runs again and claims the row anew
    except Exception as exc:
        # Anything else must still end the deployment (it would stay 'running' until the reaper's 10 minutes).
        logger.exception("Deployment %s failed unexpectedly", deployment.uid)
        _fail(deployment, f"an unexpected error ({type(exc).__name__}) stopped the deployment; the worker's log "
                          "has the details")
    return Deployment.objects.get(pk=deployment.pk)


def _fail(deployment: Deployment, error: str) -> None:
    with transaction.atomic():
        updated = Deployment.objects.filter(pk=deployment.pk, status=DeploymentStatus.RUNNING).update(
            status=DeploymentStatus.FAILED, error=error[:4000], finished_at=timezone.now(),
            log=[*deployment.log, _entry(f"Failed: {error[:500]}")])
        if updated:
            audit_record(AuditAction.DEPLOYMENT_FAIL, actor=None, target=deployment_target(deployment),
                         outcome=AuditOutcome.FAILURE, before={"status": "running"},
                         after={"status": "failed", "error": error[:1000]})
            deployment_finished.send(sender=Deployment, deployment=deployment, live=False, error=error)


def _switch(deployment: Deployment) -> None:
    """Make the deployment serve, atomically: the environment's state row is locked, changed and its generation
    bumped in one transaction; web workers pick the new generation up within a second."""
    now = timezone.now()
    with transaction.atomic():
        state, _ = EnvironmentState.objects.get_or_create(model=deployment.model, environment=deployment.environment)
        state = EnvironmentState.objects.select_for_update().get(pk=state.pk)
        before = _state_summary(state)
        retired: list[int] = []
        open_intervals = ServingInterval.objects.filter(model=deployment.model, environment=deployment.environment,
                                                        ended_at__isnull=True)
        if deployment.strategy == Strategy.REPLACE:
            retired = [d for d in (state.champion_id, state.challenger_id) if d and d != deployment.pk]
            open_intervals.update(ended_at=now)
            state.champion, state.challenger = deployment, None
            state.mode, state.challenger_percent = ServingMode.SINGLE, 0
            ServingInterval.objects.create(model=deployment.model, environment=deployment.environment,
                                           version=deployment.version, deployment=deployment, role="champion",
                                           traffic_percent=100, started_at=now)
        else:
            if state.challenger_id and state.challenger_id != deployment.pk:
                retired.append(state.challenger_id)
            open_intervals.exclude(role="champion").update(ended_at=now)
            state.challenger = deployment
            state.mode = ServingMode.CANARY if deployment.strategy == Strategy.CANARY else ServingMode.SHADOW
            state.challenger_percent = deployment.traffic_percent if deployment.strategy == Strategy.CANARY else 0
            role = "canary" if deployment.strategy == Strategy.CANARY else "shadow"
            ServingInterval.objects.create(model=deployment.model, environment=deployment.environment,
                                           version=deployment.version, deployment=deployment, role=role,
                                           traffic_percent=state.challenger_percent, started_at=now)
            if state.champion_id:
                champion_interval = open_intervals.filter(role="champion").first()
                if champion_interval and deployment.strategy == Strategy.CANARY:
                    champion_interval.ended_at = now
                    champion_interval.save(update_fields=["ended_at"])
                    ServingInterval.objects.create(model=deployment.model, environment=deployment.environment,
                                                   version=champion_interval.version,
                                                   deployment_id=state.champion_id, role="champion",
                                                   traffic_percent=100 - state.challenger_percent, started_at=now)
        state.generation += 1
        state.updated_at = now
        state.save()
        Deployment.objects.filter(pk__in=retired, status=DeploymentStatus.LIVE).update(
            status=DeploymentStatus.RETIRED, finished_at=now)
        Deployment.objects.filter(pk=deployment.pk).update(
            status=DeploymentStatus.LIVE, progress=100, finished_at=now,
            log=[*deployment.log, _entry(f"Live in {deployment.environment} ({deployment.get_strategy_display()}).")])
        audit_record(AuditAction.TRAFFIC_SWITCH, actor=None, target=deployment_target(deployment),
                     before=before, after=_state_summary(state))
        audit_record(AuditAction.DEPLOYMENT_LIVE, actor=None, target=deployment_target(deployment),
                     before={"status": "running"}, after={"status": "live", "retired": len(retired)})
        deployment_finished.send(sender=Deployment, deployment=deployment, live=True, error="")


def _state_summary(state: EnvironmentState) -> dict[str, Any]:
    def version_of(deployment_id: int | None) -> int | None:
        if not deployment_id:
            return None
        return Deployment.objects.filter(pk=deployment_id).values_list("version__number", flat=True).first()

    return {"champion": version_of(state.champion_id), "challenger": version_of(state.challenger_id),
            "mode": state.mode, "challenger_percent": state.challenger_percent, "generation": state.generation}


def deployments_reap() -> list[int]:
    """The deployments left pending or running past ``PORTAL_DEPLOYMENT_STALE_SECONDS`` (a lost message, a worker
    killed while the broker still holds its task), which the reaper task hands to a worker again. Claiming counts
    attempts, so a deployment that keeps killing its worker ends failed, never stuck."""
    cutoff = timezone.now() - dt.timedelta(seconds=settings.PORTAL_DEPLOYMENT_STALE_SECONDS)
    stale = list(Deployment.objects.filter(
        Q(status=DeploymentStatus.PENDING, created_at__lt=cutoff)
        | Q(status=DeploymentStatus.RUNNING, started_at__lt=cutoff)).values_list("pk", flat=True))
    return stale


def _environment_target(model: Any, environment: str) -> Target:
    return Target("environment", f"{model.name}/{environment}", f"{model.name} {environment}", model.team.slug)


def challenger_stop(*, model: Any, environment: str, actor: Any, reason: str = "", system: bool = False,
                    only_deployment: int | None = None) -> EnvironmentState:
    """End a canary or shadow: all traffic back to the champion. ``system`` is a stop rule acting on its own (an
    experiment's guardrail: ``actor`` is None and no capability is asked); ``only_deployment`` stops the challenger
    only if it is still that deployment (ValidationError otherwise)."""
    if not system:
        require_capability(actor, "deploy_dev" if environment == Environment.DEV else "rollback_environment")
    now = timezone.now()
    with transaction.atomic():
        state = EnvironmentState.objects.select_for_update().filter(model=model, environment=environment).first()
        if state is None or state.challenger_id is None:
            raise ValidationError({"environment": f"No canary or shadow runs in {environment}."})
        if only_deployment is not None and state.challenger_id != only_deployment:
            raise ValidationError({"environment": f"The challenger serving {environment} changed meanwhile."})
        before = _state_summary(state)
        Deployment.objects.filter(pk=state.challenger_id).update(status=DeploymentStatus.RETIRED, finished_at=now)
        ServingInterval.objects.filter(model=model, environment=environment, ended_at__isnull=True).update(ended_at=now)
        champion = Deployment.objects.get(pk=int(state.champion_id or 0))
        ServingInterval.objects.create(model=model, environment=environment, version=champion.version,
                                       deployment=champion, role="champion", traffic_percent=100, started_at=now)
        state.challenger, state.mode, state.challenger_percent = None, ServingMode.SINGLE, 0
        state.generation += 1
        state.updated_at = now
        state.save()
        audit_record(AuditAction.TRAFFIC_SWITCH, actor=actor, target=_environment_target(model, environment),
                     before=before, after=_state_summary(state), metadata={"reason": reason} if reason else None)
    return state


def canary_share_change(*, model: Any, environment: str, traffic_percent: int, actor: Any,
                        reason: str = "") -> EnvironmentState:
    """Give the canary challenger ``traffic_percent`` of the requests (1 to 99), in one transaction; web workers pick
    the new split up within a second (the generation goes up). Sticky keys keep their side unless the cut moves past
    them."""
    require_capability(actor, "deploy_dev" if environment == Environment.DEV else "rollback_environment")
    if isinstance(traffic_percent, bool) or not isinstance(traffic_percent, int) or not 1 <= traffic_percent <= 99:
        raise ValidationError({"traffic_percent": "The challenger's share is a whole percentage from 1 to 99 "
                                                  "(both sides need traffic to be compared)."})
    now = timezone.now()
    with transaction.atomic():
        state = EnvironmentState.objects.select_for_update().filter(model=model, environment=environment).first()
        if state is None or state.challenger_id is None or state.mode != ServingMode.CANARY:
            raise ValidationError({"environment": f"No canary runs in {environment}."})
        if state.challenger_percent == traffic_percent:
            return state
        before = _state_summary(state)
        open_intervals = ServingInterval.objects.filter(model=model, environment=environment, ended_at__isnull=True)
        for interval in list(open_intervals):
            interval.ended_at = now
            interval.save(update_fields=["ended_at"])
            ServingInterval.objects.create(
                model=model, environment=environment, version=interval.version, deployment=interval.deployment,
                role=interval.role, started_at=now,
                traffic_percent=traffic_percent if interval.role == "canary" else 100 - traffic_percent)
        state.challenger_percent = traffic_percent
        state.generation += 1
        state.updated_at = now
        state.save()
        audit_record(AuditAction.TRAFFIC_SWITCH, actor=actor, target=_environment_target(model, environment),
                     before=before, after=_state_summary(state), metadata={"reason": reason} if reason else None)
    return state
