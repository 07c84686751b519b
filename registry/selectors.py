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


def trust_queue(*, user: Any) -> QuerySet[ModelVersion]:
    return scope_to_teams(ModelVersion.objects.filter(trust_state="pending").select_related("model__team",
                                                                                            "uploaded_by"),
                          user, team_field="model__team").order_by("created_at")
