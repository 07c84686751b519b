from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from portal.navigation import entries_for
from portal.roles import ROLE_LABELS, roles_of


def navigation(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    return {
        "nav_entries": entries_for(user),
        "nav_roles": [ROLE_LABELS.get(r, r) for r in roles_of(user)],
        "request_id": getattr(request, "request_id", ""),
    }
