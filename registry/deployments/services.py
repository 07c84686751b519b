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
import tempfile
from pathlib import Path
from typing import Any, cast

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
from registry.serving.runtime import load_serving_model
from registry.versions.selectors import environment_param

logger = logging.getLogger(__name__)

# Events for the features above deployments (promotions listen; imports point promotions -> deployments only).
# deployment_gates(deployment=): sent when a promotion's deployment starts; each receiver returns a list of problems
# (gates that no longer pass), and any problem fails the deployment before it is prepared.
deployment_gates = Signal()
# deployment_finished(deployment=, live=, error=): sent inside the transaction that makes a deployment live or failed,
# so what a receiver records commits with it.
deployment_finished = Signal()


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

        def enqueue() -> None:
            # lazy: registry.deployments.tasks imports this module at top (cycle)
            from registry.deployments.tasks import deployment_run_task

            deployment_run_task.delay(deployment.pk, request_ctx=ctx)

        transaction.on_commit(enqueue)
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
    """The serving form: ('onnx', Blob) when the sandbox's ONNX conversion predicts exactly like the model,
    else ('native', None): web workers then load the vetted artifact itself."""
    version = deployment.version
    assert version.artifact is not None
    if version.format == "onnx":
        return _uploaded_onnx_form(deployment)
    example = _example(version)
    with storage.verified_local_path(version.artifact) as artifact:
        if version.format == "mlflow":
            target = work / "model"
            extract_zip(artifact, target)
            mlmodels = [p for p in target.rglob("MLmodel") if len(p.relative_to(target).parts) <= 2]
            path = mlmodels[0].parent
        else:
            path = work / f"model.{version.format}"
            path.symlink_to(artifact)
        out = work / "out"
        out.mkdir()
        output = out / "serving.onnx"
        trusted = version.untrusted_types if version.trust_state == TrustState.TRUSTED else []
        try:
            result = sandbox.prepare_serving(version.format, path, {"columns": example.columns, "rows": example.rows,
                                                                    "trusted_types": trusted}, out=out)
        except sandbox.SandboxUnavailable as exc:
            raise DeploymentFailed(f"the model sandbox is unavailable on this worker: {exc}") from None
    if not result.ok:
        raise DeploymentFailed(f"preparing the serving form failed: {result.error}")
    if result.data.get("kind") == "onnx" and output.is_file() and not output.is_symlink():
        # What the sandbox wrote is the claim of a process that loaded the model: checked here, by the portal,
        # before anything credentialed loads it or it is kept.
        review = _review_onnx_file(output, "the sandbox's ONNX form")
        if not review.sandbox_reasons:
            return "onnx", storage.blob_put_path(output)
        result.data["reason"] = "its ONNX form uses " + "; ".join(review.sandbox_reasons)
    if version.format == "mlflow":
        _step(deployment, 45, f"Serving with MLflow's own scoring code in a sandboxed model host "
                              f"({result.data.get('reason', 'no ONNX form')}).")
        return "mlflow", None
    _step(deployment, 45, f"Serving from a sandboxed model host: {result.data.get('reason', 'no ONNX form')}.")
    return "native", None


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
        return "onnx", version.artifact
    why = "; ".join(review.sandbox_reasons)
    unavailable = sandbox.unavailable_reason()
    if unavailable:
        raise DeploymentFailed(f"the ONNX graph uses {why}, which the web workers do not run in-process; it needs a "
                               f"sandboxed model host, and none can start here ({unavailable})")
    _step(deployment, 45, f"Serving from a sandboxed model host: the ONNX graph uses {why}, which the web workers "
                          "do not run in-process.")
    return "native", None


def onnx_serving_problems(path: Path) -> list[str]:
    """Why an ONNX file may not serve in a web worker (empty: it may): a tensor keeping its data in another file,
    or what only a sandboxed host runs. Kept for callers of the earlier check; ``_review_onnx_file`` is the one the
    deployment uses."""
    try:
        review = review_onnx(path.read_bytes())
    except OnnxRefused as exc:
        return [str(exc)]
    return ([review.refusal] if review.refusal else []) + review.sandbox_reasons


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
    """Hand deployments left pending or running past ``PORTAL_DEPLOYMENT_STALE_SECONDS`` to a worker again (a lost
    message, a worker killed while the broker still holds its task). Claiming counts attempts, so a deployment that
    keeps killing its worker ends failed, never stuck."""
    # lazy: registry.deployments.tasks imports this module at top (cycle)
    from registry.deployments.tasks import deployment_run_task

    cutoff = timezone.now() - dt.timedelta(seconds=settings.PORTAL_DEPLOYMENT_STALE_SECONDS)
    stale = list(Deployment.objects.filter(
        Q(status=DeploymentStatus.PENDING, created_at__lt=cutoff)
        | Q(status=DeploymentStatus.RUNNING, started_at__lt=cutoff)).values_list("pk", flat=True))
    for pk in stale:
        deployment_run_task.delay(pk)
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
