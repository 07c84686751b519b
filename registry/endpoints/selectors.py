"""Reads of multi-model endpoints, always through the user's team scope."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from portal.permissions import get_object_for_user, scope_to_teams
from registry.models import Endpoint, EnvironmentState

RELATED = ("team", "default_model", "created_by")


def endpoint_list(*, user: Any, environment: str = "") -> QuerySet[Endpoint]:
    qs = scope_to_teams(Endpoint.objects.select_related(*RELATED), user)
    if environment:
        qs = qs.filter(environment=environment)
    return qs.order_by("name", "environment")


def endpoint_get(*, user: Any, name: str, environment: str, action: str | None = "view_models") -> Endpoint:
    """Another team's endpoint (or none) is a 404; a role without ``action``, a 403."""
    return get_object_for_user(user, Endpoint.objects.select_related(*RELATED), action=action, name=name,
                               environment=environment)


def endpoint_rules(endpoint: Endpoint) -> list[dict[str, Any]]:
    """Its rules in order, each with whether its model is served in the endpoint's environment now."""
    rules = list(endpoint.rules.select_related("model").order_by("position"))
    models = {r.model_id for r in rules} | ({endpoint.default_model_id} if endpoint.default_model_id else set())
    served = dict(EnvironmentState.objects.filter(model_id__in=models, environment=endpoint.environment,
                                                  champion__isnull=False)
                  .values_list("model_id", "champion__version__number"))
    return [{"position": r.position, "kind": r.kind, "kind_label": r.get_kind_display(), "key": r.key,
             "values": list(r.values), "percent": r.percent, "model": r.model.name,
             "serving_version": served.get(r.model_id)} for r in rules] + (
        [{"position": None, "kind": "default", "kind_label": "Every other row", "key": "", "values": [],
          "percent": None, "model": endpoint.default_model.name,
          "serving_version": served.get(endpoint.default_model.pk)}] if endpoint.default_model else [])


def deployable_models(*, endpoint_team_id: int, environment: str) -> list[str]:
    """The names of a team's models served in ``environment`` now: what a rule may name."""
    return list(EnvironmentState.objects.filter(model__team_id=endpoint_team_id, environment=environment,
                                                champion__isnull=False)
                .order_by("model__name").values_list("model__name", flat=True))
