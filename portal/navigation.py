"""The navigation each role sees. Every entry names the capability it needs; the server checks it again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.urls import reverse

from portal.permissions import has_capability


@dataclass(frozen=True)
class NavEntry:
    label: str
    url_name: str
    capability: str | None = None  # None: every signed-in user
    staff_only: bool = False


ENTRIES: list[NavEntry] = [
    NavEntry("Home", "portal:home"),
    NavEntry("Models", "registry:models", "view_models"),
    NavEntry("Promotions", "registry:promotions", "view_models"),
    NavEntry("Endpoints", "registry:endpoints", "view_models"),
    NavEntry("Monitoring", "monitoring:portfolio", "view_monitoring"),
    NavEntry("MLflow", "registry:mlflow-connections", "manage_teams"),  # team members reach it from a model page
    NavEntry("Audit trail", "portal:audit", "view_audit"),
    NavEntry("Data subjects", "portal:subject-access", "manage_subjects"),
    NavEntry("API docs", "api-docs"),
    NavEntry("Account", "portal:account"),
    NavEntry("Administration", "admin:index", "manage_teams", staff_only=True),
]


def entries_for(user: Any) -> list[dict[str, str]]:
    if not getattr(user, "is_authenticated", False):
        return []
    visible = []
    for entry in ENTRIES:
        if entry.capability and not has_capability(user, entry.capability):
            continue
        if entry.staff_only and not user.is_staff:
            continue
        visible.append({"label": entry.label, "url": reverse(entry.url_name)})
    return visible
