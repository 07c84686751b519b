"""Permission checks in one place: capabilities by role, objects scoped to the user's teams.

An object outside the user's teams is a 404 (its existence is not revealed); one inside them that the user's
role may not act on is a 403.
"""

from __future__ import annotations

from typing import Any, TypeVar

from django.core.exceptions import PermissionDenied
from django.db.models import Model, QuerySet
from django.http import Http404
from rest_framework.permissions import BasePermission

from portal.models import Membership

M = TypeVar("M", bound=Model)


def has_capability(user: Any, codename: str) -> bool:
    return bool(getattr(user, "is_authenticated", False) and user.is_active and user.has_perm(f"portal.{codename}"))


def require_capability(user: Any, codename: str) -> None:
    if not has_capability(user, codename):
        raise PermissionDenied(f"Your role does not allow this ({codename.replace('_', ' ')}).")


def team_ids_for(user: Any) -> set[int] | None:
    """The ids of the teams whose objects ``user`` may see; None means every team."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return set()
    if has_capability(user, "view_all_teams"):
        return None
    cached = getattr(user, "_portal_team_ids", None)
    if cached is None:
        cached = set(Membership.objects.filter(user=user).values_list("team_id", flat=True))
        user._portal_team_ids = cached
    return set(cached)


def team_path(model: type[Any]) -> str:
    """The lookup from ``model`` to the team whose members see it, declared once on the model as ``team_path``."""
    return str(getattr(model, "team_path", "team"))


def scope_to_teams(queryset: QuerySet[M], user: Any) -> QuerySet[M]:
    teams = team_ids_for(user)
    if teams is None:
        return queryset
    return queryset.filter(**{f"{team_path(queryset.model)}__in": teams})


def get_object_for_user(
    user: Any,
    queryset: QuerySet[M],
    *,
    action: str | None = None,
    **lookup: Any,
) -> M:
    """Fetch one object the user may see, then check that their role allows ``action`` on it."""
    obj = scope_to_teams(queryset, user).filter(**lookup).first()
    if obj is None:
        raise Http404("Not found.")
    if action is not None:
        require_capability(user, action)
    return obj


class HasCapability(BasePermission):
    """DRF permission: ``permission_classes = [HasCapability.of("view_audit")]``."""

    capability = ""
    message = "Your role does not allow this."

    @classmethod
    def of(cls, codename: str) -> type[HasCapability]:
        return type(f"Has_{codename}", (cls,), {"capability": codename,
                                                "message": f"Your role does not allow this ({codename.replace('_', ' ')})."})

    def has_permission(self, request: Any, view: Any) -> bool:
        return has_capability(request.user, self.capability)
