"""Every page of the foundation, for every persona: who sees it, who is sent to sign in, who is refused."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db

# page -> expected status per persona (None: anonymous). 302 for anonymous means "sent to the login page".
PAGES: dict[str, dict[str | None, int]] = {
    "/": {None: 302, "outsider": 200, "viewer": 200, "ds": 200, "approver1": 200, "compliance": 200, "admin": 200},
    "/account/": {None: 302, "outsider": 200, "viewer": 200, "ds": 200, "approver1": 200, "compliance": 200,
                  "admin": 200},
    "/audit/": {None: 302, "outsider": 403, "viewer": 403, "ds": 403, "approver1": 403, "compliance": 200,
                "admin": 200},
    "/admin/": {None: 302, "outsider": 302, "viewer": 302, "ds": 302, "approver1": 302, "compliance": 302,
                "admin": 200},
    "/login/": {None: 200, "outsider": 302, "viewer": 302, "ds": 302, "approver1": 302, "compliance": 302,
                "admin": 302},
    "/healthz": {None: 200, "ds": 200},
    "/readyz": {None: 200, "ds": 200},
    "/api/schema/": {None: 200, "ds": 200},
    "/api/docs/": {None: 200, "ds": 200},
}


@pytest.mark.parametrize("path,persona", [(p, who) for p, table in PAGES.items() for who in table],
                         ids=[f"{p}-{who}" for p, table in PAGES.items() for who in table])
def test_page_access(client: Client, personas: dict[str, Any], path: str, persona: str | None) -> None:
    if persona:
        client.force_login(personas[persona])
    response = client.get(path)
    assert response.status_code == PAGES[path][persona]
    if response.status_code == 302 and persona is None and path not in ("/admin/",):
        assert response.headers["Location"].startswith("/login/")


def test_the_audit_page_filters_and_verifies(client: Client, personas: dict[str, Any]) -> None:
    client.force_login(personas["compliance"])
    page = client.get("/audit/", {"action": "auth"})
    assert page.status_code == 200
    bad = client.get("/audit/", {"since": "not a date"})
    assert bad.status_code == 400 and b"Enter a valid date/time." in bad.content
    verified = client.post("/audit/verify", follow=True)
    assert b"The chain holds" in verified.content


def test_the_audit_verify_button_is_refused_to_data_scientists(client: Client, personas: dict[str, Any]) -> None:
    client.force_login(personas["ds"])
    assert client.post("/audit/verify").status_code == 403


def test_security_headers_are_on_every_page(client: Client, personas: dict[str, Any]) -> None:
    client.force_login(personas["compliance"])
    for path in ("/", "/account/", "/audit/", "/api/docs/", "/login/"):
        response = client.get(path)
        assert "script-src 'self'" in response.headers["Content-Security-Policy"], path
        assert response.headers["X-Frame-Options"] == "DENY", path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Referrer-Policy"] == "same-origin", path
