"""Reads for accounts and the audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Q, QuerySet

from portal.models import ApiToken, AuditEvent, Team
from portal.permissions import team_ids_for


def token_list(*, user: Any) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user).order_by("-created_at")


def team_list(*, user: Any) -> QuerySet[Team]:
    teams = team_ids_for(user)
    qs = Team.objects.all()
    return qs if teams is None else qs.filter(pk__in=teams)


def audit_event_list(
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    outcome: str | None = None,
    team: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    request_id: str | None = None,
    model: str | None = None,
) -> QuerySet[AuditEvent]:
    """Filtered events, newest first. ``action`` matches a label or a domain prefix (``auth`` or ``auth.``);
    ``target`` is ``type`` or ``type:id``."""
    qs = AuditEvent.objects.all()
    if actor:
        qs = qs.filter(actor_username=actor)
    if action:
        qs = qs.filter(action=action) if "." in action.rstrip(".") else qs.filter(action__startswith=action.rstrip(".") + ".")
    if target:
        kind, _, ident = target.partition(":")
        qs = qs.filter(target_type=kind)
        if ident:
            qs = qs.filter(target_id=ident)
    if outcome:
        qs = qs.filter(outcome=outcome)
    if team:
        qs = qs.filter(team_slug=team)
    if request_id:
        qs = qs.filter(request_id=request_id)
    if model:
        # The model itself, its versions and environments ("name/..."), its deployments and promotions ("name v1 ...").
        qs = qs.filter(Q(target_type="registeredmodel", target_id=model) | Q(target_id__startswith=model + "/")
                       | Q(target_repr__startswith=model + " "))
    if since:
        qs = qs.filter(timestamp__gte=since)
    if until:
        qs = qs.filter(timestamp__lt=until)
    return qs.order_by("-seq")


def audit_events_for_user(*, user: Any, limit: int = 10) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(Q(actor=user) | Q(actor_username=user.get_username())).order_by("-seq")[:limit]
