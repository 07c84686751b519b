"""Reads of the registry, always through the user's team scope."""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.db.models import Count, Max, Q, QuerySet

from portal.models import AuditEvent
from portal.permissions import get_object_for_user, scope_to_teams
from registry.models import (BATCH_ACTIVE, ENVIRONMENT_ORDER, BatchStatus, Deployment, Environment, EnvironmentState,
                             MlflowSyncJob, MlflowSyncStatus, ModelAlias, ModelVersion, RegisteredModel)
from registry.versions.compare import metric_diff, signature_diff

MODEL_SORTS = {
    "name": ("name",), "-name": ("-name",), "team": ("team__slug", "name"),
    "versions": ("-version_count", "name"), "updated": ("-last_upload", "name"),
}


def model_list(*, user: Any, search: str = "", team: str = "", sort: str = "name") -> QuerySet[RegisteredModel]:
    """The models of the user's teams; ``search`` matches name, description or a tag exactly; ``sort`` is a key of
    ``MODEL_SORTS`` (anything else sorts by name)."""
    qs = scope_to_teams(RegisteredModel.objects.select_related("team"), user)
    if search:
        match = Q(name__icontains=search) | Q(description__icontains=search)
        if connection.features.supports_json_field_contains:
            match |= Q(tags__contains=[search])
        qs = qs.filter(match)
    if team:
        qs = qs.filter(team__slug=team)
    return qs.annotate(version_count=Count("versions"), latest_version=Max("versions__number"),
                       last_upload=Max("versions__created_at")).order_by(*MODEL_SORTS.get(sort, ("name",)))


def where_live(*, models: list[RegisteredModel]) -> dict[int, list[dict[str, Any]]]:
    """Per model id: each environment that serves it, in order, with its version and any canary or shadow."""
    out: dict[int, list[dict[str, Any]]] = {m.pk: [] for m in models}
    states = EnvironmentState.objects.filter(model__in=models, champion__isnull=False).select_related(
        "champion__version", "challenger__version")
    order = [str(env) for env in ENVIRONMENT_ORDER]
    for state in sorted(states, key=lambda s: order.index(s.environment)):
        out[state.model_id].append({
            "environment": state.environment, "version": state.champion.version.number,  # type: ignore[union-attr]
            "challenger": state.challenger.version.number if state.challenger else None, "mode": state.mode,
            "challenger_percent": state.challenger_percent})
    return out


def aliases_of(*, models: list[RegisteredModel]) -> dict[int, list[dict[str, Any]]]:
    """Each model's aliases (``@champion`` → version), in one query: for the models list, model page and API, and
    for the MLflow write-back, which reads them."""
    out: dict[int, list[dict[str, Any]]] = {}
    for model_id, name, number in ModelAlias.objects.filter(model__in=models).order_by("name").values_list(
            "model_id", "name", "version__number"):
        out.setdefault(model_id, []).append({"alias": name, "version": number})
    return out


def reference_profile_rows(*, version: ModelVersion) -> list[dict[str, Any]]:
    """The reference data's profile per column, as the version page and the compare page show it."""
    profile = (version.reference.profile if version.reference is not None else None) or {}
    features = profile.get("features") or {}
    # jsonb keeps keys in its own order (shortest first): show the model's inputs in signature order, then the rest.
    inputs = [str(c.get("name")) for c in (version.signature or {}).get("inputs") or [] if isinstance(c, dict)]
    order = [n for n in inputs if n in features] + sorted(n for n in features if n not in set(inputs))
    rows = []
    for name in order:
        feature = features[name]
        row: dict[str, Any] = {"name": name, "kind": feature.get("kind"), "missing_rate": feature.get("missing_rate")}
        if feature.get("kind") == "numeric":
            edges = feature.get("edges") or []
            row.update({k: feature.get(k) for k in ("mean", "std", "min", "max")})
            row["median"] = edges[len(edges) // 2] if edges else None
        else:
            frequencies = feature.get("frequencies") or {}
            total = sum(frequencies.values()) or 1
            row["top"] = [(label, count / total) for label, count in list(frequencies.items())[:3]]
            row["categories"] = len(frequencies)
        rows.append(row)
    return rows


def version_compare(*, a: ModelVersion, b: ModelVersion) -> dict[str, Any]:
    """Two versions of one model side by side: facts, metrics, signature, model card and reference profile."""

    facts = [(label, getter(a), getter(b)) for label, getter in (
        ("Status", lambda v: v.get_status_display()), ("Format", lambda v: v.get_format_display()),
        ("SHA-256", lambda v: v.artifact_sha256), ("Uploaded", lambda v: v.created_at),
        ("Uploaded by", lambda v: str(v.uploaded_by or "—")), ("Git commit", lambda v: v.git_commit or "—"),
        ("Training data hash", lambda v: v.training_data_hash or "—"), ("Tags", lambda v: ", ".join(v.tags) or "—"))]
    card = [(label, getattr(a, field) or "", getattr(b, field) or "") for label, field in (
        ("Description", "description"), ("Intended use", "intended_use"), ("Limitations", "limitations"),
        ("Ethical considerations", "ethical_considerations"))]
    profile_a = {r["name"]: r for r in reference_profile_rows(version=a)}
    profile_b = {r["name"]: r for r in reference_profile_rows(version=b)}
    profile = [{"name": n, "a": profile_a.get(n), "b": profile_b.get(n)}
               for n in list(profile_a) + [n for n in profile_b if n not in profile_a]]
    signature = signature_diff(b, a)
    params_a, params_b = a.params or {}, b.params or {}
    params = [{"name": n, "a": params_a.get(n), "b": params_b.get(n),
               "changed": params_a.get(n) != params_b.get(n)} for n in sorted(set(params_a) | set(params_b))]
    runs = [_run(v) for v in (a, b)]
    return {"facts": facts, "metrics": metric_diff(b, a, 0.0), "signature": signature,
            "signature_changed": sum(1 for r in signature if r["change"] != "unchanged"), "card": card,
            "profile": profile, "params": params, "params_changed": sum(1 for p in params if p["changed"]),
            "runs": runs if any(runs) else None}


def _run(version: ModelVersion) -> dict[str, Any] | None:
    """The MLflow run a version was imported from (name, id, experiment, link), or None for an upload."""
    source = getattr(version, "mlflow_source", None)
    if source is None:
        return None
    return {"run_id": source.run_id, "run_name": source.run_name, "experiment": source.experiment_name,
            "url": source.run_url, "uri": source.uri}


def model_get(*, user: Any, name: str, action: str | None = None) -> RegisteredModel:
    return get_object_for_user(user, RegisteredModel.objects.select_related("team"), action=action, name=name)


def version_get(*, user: Any, name: str, number: int, action: str | None = None) -> ModelVersion:
    return get_object_for_user(
        user,
        ModelVersion.objects.select_related("model__team", "uploaded_by", "trust_decided_by", "artifact",
                                            "reference__blob", "mlflow_source"),
        action=action, model__name=name, number=number,
    )


def version_list(*, model: RegisteredModel) -> QuerySet[ModelVersion]:
    return model.versions.select_related("uploaded_by").order_by("-number")


def version_audit_timeline(*, version: ModelVersion) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(target_type="modelversion",
                                     target_id=f"{version.model.name}/{version.number}").order_by("seq")


def environment_overview(*, model: RegisteredModel) -> dict[str, dict[str, Any]]:
    """For each environment: the serving versions, traffic split and the latest deployments."""
    states = {s.environment: s for s in EnvironmentState.objects.filter(model=model).select_related(
        "champion__version", "challenger__version")}
    recent = list(Deployment.objects.filter(model=model).select_related("version", "requested_by")
                  .order_by("-created_at")[:30])
    overview = {}
    for env in ENVIRONMENT_ORDER:
        state = states.get(env)
        overview[str(env)] = {
            "champion": state.champion.version.number if state and state.champion else None,
            "challenger": state.challenger.version.number if state and state.challenger else None,
            "mode": state.mode if state else "single",
            "challenger_percent": state.challenger_percent if state else 0,
            "updated_at": state.updated_at if state else None,
            "deployments": [d for d in recent if d.environment == env][:5],
        }
    return overview


def deployment_get(*, user: Any, uid: str) -> Any:
    return get_object_for_user(user, Deployment.objects.select_related("model__team", "version", "requested_by"),
                               action="view_models", uid=uid)


def environment_param(env: str) -> str:
    """An environment named in a URL or body; a clear 400 (Django ValidationError) for anything else."""
    from django.core.exceptions import ValidationError


    if env not in Environment.values:
        raise ValidationError({"environment": f"Unknown environment {env[:20]!r}: use dev, stage or prod."})
    return env


def batch_job_state(*, job: Any) -> dict[str, Any]:
    """Where a batch job stands, in one sentence, and whether anything will still change (``final``): a done job
    is final only once every scored chunk's predictions are in the prediction log."""
    bad = f"{job.rows_failed:,} bad row{'s' if job.rows_failed != 1 else ''}"
    if job.status in BATCH_ACTIVE:
        total = f" of {job.rows_total:,}" if job.rows_total else ""
        return {"final": False, "phase": "running", "logs_pending": None,
                "text": f"{job.get_status_display()}: {job.rows_done:,}{total} rows scored so far, {bad}."}
    if job.status == BatchStatus.FAILED:
        return {"final": True, "phase": "failed", "logs_pending": 0,
                "text": f"Failed after {job.rows_done:,} rows: {job.error or 'see the log'}"}
    if job.status == BatchStatus.CANCELLED:
        return {"final": True, "phase": "cancelled", "logs_pending": 0,
                "text": f"Cancelled after {job.rows_done:,} rows; chunks not yet scored were not."}
    pending = job.chunks.filter(logged=False).exclude(log_name="").count()
    scored = f"Done: {job.rows_done:,} rows scored, {bad}"
    if pending:
        return {"final": False, "phase": "logging", "logs_pending": pending,
                "text": f"{scored}. Logging predictions for monitoring: {job.rows_logged:,} so far "
                        f"({pending} chunk{'s' if pending != 1 else ''} to go)."}
    logged = (f"all {job.rows_logged:,} predictions logged for monitoring" if job.rows_logged
              else "predictions are not logged for monitoring")
    return {"final": True, "phase": "done", "logs_pending": 0, "text": f"{scored}; {logged}."}


def mlflow_sync_problems(*, model: RegisteredModel, limit: int = 10) -> list[MlflowSyncJob]:
    """The MLflow sync jobs about ``model`` a person should see on its page: failures, retries, work under way
    (done and duplicate ones are in the audit trail)."""
    return list(MlflowSyncJob.objects.filter(Q(model=model) | Q(registered_model=model.name,
                                                                connection__team_id=model.team_id))
                .exclude(status__in=[MlflowSyncStatus.DONE, MlflowSyncStatus.DUPLICATE])
                .select_related("connection").order_by("-created_at")[:limit])
