"""The five roles of the contract and the capabilities each holds.

Viewers read and nothing else: scoring a model and sending its ground truth (``score``) write to the prediction log
and feed monitoring, so they belong to the roles that act on models. An API token carries its user's roles: a
pipeline's or a service's token scores when the account it was made for holds ``score``.

Roles are Django groups; capabilities are the permissions declared on ``portal.Team``. ``sync_roles`` makes the
database match this table and runs after every ``migrate``, so a deployment never drifts from the code.
"""

from __future__ import annotations

from typing import Any

DATA_SCIENTIST = "data_scientist"
APPROVER = "approver"
COMPLIANCE_OFFICER = "compliance_officer"
ADMIN = "admin"
VIEWER = "viewer"

ROLES: dict[str, tuple[str, ...]] = {
    VIEWER: ("view_models", "view_monitoring"),
    DATA_SCIENTIST: (
        "view_models",
        "view_monitoring",
        "register_model",
        "deploy_dev",
        "request_promotion",
        "download_artifact",
        "run_batch",
        "score",
        "manage_alerts",
    ),
    APPROVER: (
        "view_models",
        "view_monitoring",
        "score",
        "manage_alerts",
        "approve_promotion",
        "rollback_environment",
        "decide_trust",
        "download_artifact",
    ),
    COMPLIANCE_OFFICER: (
        "view_models",
        "view_monitoring",
        "view_audit",
        "export_audit",
        "manage_subjects",
        "view_sensitive",
        "view_all_teams",
    ),
    ADMIN: (
        "view_models",
        "view_monitoring",
        "register_model",
        "deploy_dev",
        "request_promotion",
        "approve_promotion",
        "rollback_environment",
        "decide_trust",
        "download_artifact",
        "run_batch",
        "score",
        "manage_alerts",
        "view_audit",
        "export_audit",
        "manage_subjects",
        "view_sensitive",
        "view_all_teams",
        "manage_teams",
    ),
}

ROLE_LABELS = {
    VIEWER: "Viewer",
    DATA_SCIENTIST: "Data scientist",
    APPROVER: "Approver",
    COMPLIANCE_OFFICER: "Compliance officer",
    ADMIN: "Administrator",
}


def sync_roles(**_: Any) -> None:
    """Create the groups and give each exactly its capabilities (idempotent)."""
    from django.contrib.auth.models import Group, Permission
    from django.contrib.contenttypes.models import ContentType

    from portal.models import Team

    team_ct = ContentType.objects.get_for_model(Team)
    codenames = {c for caps in ROLES.values() for c in caps}
    perms = {}
    for codename in codenames:
        perm, _created = Permission.objects.get_or_create(
            content_type=team_ct, codename=codename, defaults={"name": codename.replace("_", " ").capitalize()}
        )
        perms[codename] = perm
    for role, caps in ROLES.items():
        group, _created = Group.objects.get_or_create(name=role)
        group.permissions.set([perms[c] for c in caps])


def roles_of(user: Any) -> list[str]:
    if not getattr(user, "is_authenticated", False):
        return []
    cached = getattr(user, "_portal_roles", None)
    if cached is None:
        cached = sorted(user.groups.values_list("name", flat=True))
        user._portal_roles = cached
    return list(cached)
