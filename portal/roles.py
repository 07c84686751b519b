"""The five roles of the contract and the capabilities each holds.

Viewers read and nothing else: scoring a model and sending its ground truth (``score``) write to the prediction log
and feed monitoring, so they belong to the roles that act on models. An API token carries its user's roles: a
pipeline's or a service's token scores when the account it was made for holds ``score``.

Roles are Django groups; capabilities are the permissions declared on ``portal.Team`` from ``CAPABILITIES``. ``sync_roles`` makes the
database match this table and runs after every ``migrate``, so a deployment never drifts from the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DATA_SCIENTIST = "data_scientist"
APPROVER = "approver"
COMPLIANCE_OFFICER = "compliance_officer"
ADMIN = "admin"
VIEWER = "viewer"

# Every capability, declared once: its permission on ``portal.Team`` (the Meta's ``permissions``, which the admin
# shows and migrations record), how the account page says the user may do it (None: not listed there), and the roles
# that hold it. ROLES (the groups ``sync_roles`` keeps in step), ``TEAM_PERMISSIONS`` and ``CAPABILITY_TEXT`` derive
# from it; views check capabilities by codename (``portal.permissions.has_capability``).


@dataclass(frozen=True)
class Capability:
    codename: str
    description: str
    account_text: str | None
    roles: frozenset[str]


_EVERY_ROLE = frozenset({VIEWER, DATA_SCIENTIST, APPROVER, COMPLIANCE_OFFICER, ADMIN})
_MAKERS = frozenset({DATA_SCIENTIST, ADMIN})
_CHECKERS = frozenset({APPROVER, ADMIN})
_ACTORS = frozenset({DATA_SCIENTIST, APPROVER, ADMIN})
_COMPLIANCE = frozenset({COMPLIANCE_OFFICER, ADMIN})

CAPABILITIES: tuple[Capability, ...] = (
    Capability("view_models", "See the registered models of one's teams",
               "See your teams' registered models and versions", _EVERY_ROLE),
    Capability("register_model", "Register models and upload versions", "Register models and upload versions", _MAKERS),
    Capability("deploy_dev", "Deploy a version to the dev environment", "Deploy versions to dev", _MAKERS),
    Capability("request_promotion", "Request a promotion to stage or prod", "Request promotion to stage and prod",
               _MAKERS),
    Capability("approve_promotion", "Approve or reject promotion requests",
               "Approve or reject promotions (never your own)", _CHECKERS),
    Capability("rollback_environment", "Roll an environment back to an earlier version", "Roll an environment back",
               _CHECKERS),
    Capability("decide_trust", "Decide to trust a model file's untrusted types",
               "Decide whether to trust a model file's unusual types", _CHECKERS),
    Capability("download_artifact", "Download model artifacts", "Download model artifacts", _ACTORS),
    Capability("run_batch", "Submit batch scoring jobs", "Run batch scoring jobs", _MAKERS),
    Capability("score", "Score a deployed model in real time and send its ground truth",
               "Score deployed models and send their ground truth", _ACTORS),
    Capability("view_monitoring", "See monitoring pages", "See monitoring pages", _EVERY_ROLE),
    Capability("manage_alerts", "Acknowledge and resolve alerts, set a model's monitoring thresholds", None, _ACTORS),
    Capability("view_audit", "Search the audit trail", "Search the audit trail and verify its chain", _COMPLIANCE),
    Capability("export_audit", "Export the audit trail", "Export the audit trail with a signed manifest", _COMPLIANCE),
    Capability("manage_subjects", "Answer data subject access and erasure requests",
               "Answer data subject access and erasure requests", _COMPLIANCE),
    Capability("view_sensitive", "See personal and health data in payloads",
               "See personal and health data in payloads", _COMPLIANCE),
    Capability("view_all_teams", "See every team's models, not only one's own", "See every team's models",
               _COMPLIANCE),
    Capability("manage_teams", "Create teams and manage memberships", "Manage teams, users and roles",
               frozenset({ADMIN})),
)

ROLES: dict[str, tuple[str, ...]] = {
    role: tuple(c.codename for c in CAPABILITIES if role in c.roles)
    for role in (VIEWER, DATA_SCIENTIST, APPROVER, COMPLIANCE_OFFICER, ADMIN)
}
TEAM_PERMISSIONS: list[tuple[str, str]] = [(c.codename, c.description) for c in CAPABILITIES]
CAPABILITY_TEXT: dict[str, str] = {c.codename: c.account_text for c in CAPABILITIES if c.account_text}

ROLE_LABELS = {
    VIEWER: "Viewer",
    DATA_SCIENTIST: "Data scientist",
    APPROVER: "Approver",
    COMPLIANCE_OFFICER: "Compliance officer",
    ADMIN: "Administrator",
}


def sync_roles(**_: Any) -> None:
    """Create the groups and give each exactly its capabilities (idempotent)."""
    from django.apps import apps
    from django.contrib.auth.models import Group, Permission
    from django.contrib.contenttypes.models import ContentType

    # Through the app registry: portal.models imports this module (TEAM_PERMISSIONS), not the other way round.
    team_ct = ContentType.objects.get_for_model(apps.get_model("portal", "Team"))
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
