"""Reads of the registry, always through the user's team scope."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Max, Q, QuerySet

from portal.models import AuditEvent
from portal.permissions import get_object_for_user, scope_to_teams
from registry.models import ModelVersion, RegisteredModel


def model_list(*, user: Any, search: str = "", team: str = "") -> QuerySet[RegisteredModel]:
    qs = scope_to_teams(RegisteredModel.objects.select_related("team"), user)
    if search:
        qs = qs.filter(Q(name__icontains=search) | Q(description__icontains=search))
    if team:
        qs = qs.filter(team__slug=team)
    return qs.annotate(version_count=Count("versions"), latest_version=Max("versions__number")).order_by("name")


def model_get(*, user: Any, name: str, action: str | None = None) -> RegisteredModel:
    return get_object_for_user(user, RegisteredModel.objects.select_related("team"), action=action, name=name)


def version_get(*, user: Any, name: str, number: int, action: str | None = None) -> ModelVersion:
    return get_object_for_user(
        user,
        ModelVersion.objects.select_related("model__team", "uploaded_by", "trust_decided_by", "artifact",
                                            "reference__blob"),
        action=action, team_field="model__team", model__name=name, number=number,
    )


def version_list(*, model: RegisteredModel) -> QuerySet[ModelVersion]:
    return model.versions.select_related("uploaded_by").order_by("-number")


def version_audit_timeline(*, version: ModelVersion) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(target_type="modelversion",
                                     target_id=f"{version.model.name}/{version.number}").order_by("seq")


def environment_overview(*, model: RegisteredModel) -> dict[str, dict[str, Any]]:
    """For each environment: the serving versions, traffic split and the latest deployments."""
    from registry.models import ENVIRONMENT_ORDER, Deployment, EnvironmentState

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
    from registry.models import Deployment

    return get_object_for_user(user, Deployment.objects.select_related("model__team", "version", "requested_by"),
                               action="view_models", team_field="model__team", uid=uid)


def trust_queue(*, user: Any) -> QuerySet[ModelVersion]:
    return scope_to_teams(ModelVersion.objects.filter(trust_state="pending").select_related("model__team",
                                                                                            "uploaded_by"),
                          user, team_field="model__team").order_by("created_at")


def environment_param(env: str) -> str:
    """An environment named in a URL or body; a clear 400 (Django ValidationError) for anything else."""
    from django.core.exceptions import ValidationError

    from registry.models import Environment

    if env not in Environment.values:
        raise ValidationError({"environment": f"Unknown environment {env[:20]!r}: use dev, stage or prod."})
    return env
