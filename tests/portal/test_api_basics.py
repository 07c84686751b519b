"""The API's error shape, its schema and docs, and role checks on the audit endpoints."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from portal.models import AuditEvent
from tests.conftest import assert_error_shape

pytestmark = pytest.mark.django_db


def _session(user: Any) -> APIClient:
    """A signed-in browser session (token creation takes one; a bearer token is refused there)."""
    client = APIClient()
    client.force_login(user)
    return client


def test_malformed_json_is_a_400_with_the_contracts_shape(personas: dict[str, Any]) -> None:
    client = _session(personas["ds"])
    response = client.post("/api/v1/tokens/", data=b'{"name": ', content_type="application/json")
    body = assert_error_shape(response, 400, "parse_error")
    assert "JSON" in body["error"]["message"]


def test_a_wrong_schema_names_the_field(personas: dict[str, Any]) -> None:
    client = _session(personas["ds"])
    body = assert_error_shape(client.post("/api/v1/tokens/", {"name": ["a"]}, format="json"), 400, "invalid")
    assert "name" in body["error"]["details"] and body["error"]["message"].startswith("The request is not valid: name")


def test_an_unknown_api_path_is_json_404(personas: dict[str, Any], api_as: Any) -> None:
    assert_error_shape(api_as(personas["ds"]).get("/api/v1/no-such-thing"), 404, "not_found")


def test_anonymous_calls_get_401_json() -> None:
    body = assert_error_shape(APIClient().get("/api/v1/me"), 401, "not_authenticated")
    assert "credentials" in body["error"]["message"].lower()


def test_an_unsupported_method_is_405_json(personas: dict[str, Any], api_as: Any) -> None:
    assert_error_shape(api_as(personas["ds"]).put("/api/v1/me", {}, format="json"), 405, "method_not_allowed")


def test_session_calls_without_csrf_are_refused(client: Any, personas: dict[str, Any]) -> None:
    from django.test import Client

    csrf_client = Client(enforce_csrf_checks=True)
    csrf_client.force_login(personas["ds"])
    assert_error_shape(csrf_client.post("/api/v1/tokens/", {"name": "x"}, content_type="application/json"), 403)


def test_schema_and_docs_are_served_without_any_cdn(client: Any) -> None:
    schema = client.get("/api/schema/")
    assert schema.status_code == 200 and b"openapi" in schema.content and b"bearerAuth" in schema.content
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "https://" not in html.replace("https://swagger.io", "")
    assert "<script>" not in html, "the split view keeps inline scripts out, so the CSP can forbid them"


def test_audit_search_filters_and_validates(personas: dict[str, Any], api_as: Any) -> None:
    client = api_as(personas["compliance"])
    page = client.get("/api/v1/audit/events", {"action": "token"}).json()
    assert page["count"] == AuditEvent.objects.filter(action__startswith="token.").count() > 0
    assert {r["action"] for r in page["results"]} == {"token.create"}
    by_actor = client.get("/api/v1/audit/events", {"actor": "casey", "action": "token.create"}).json()
    assert by_actor["count"] == 1
    bad = assert_error_shape(client.get("/api/v1/audit/events", {"from": "yesterday"}), 400, "invalid")
    assert "since" in bad["error"]["details"] or "from" in bad["error"]["details"]
    assert_error_shape(client.get("/api/v1/audit/events", {"from": "2026-02-01T00:00:00Z",
                                                           "to": "2026-01-01T00:00:00Z"}), 400, "invalid")
    assert_error_shape(client.get("/api/v1/audit/events", {"outcome": "maybe"}), 400, "invalid")


def test_audit_verify_reports_and_records_itself(personas: dict[str, Any], api_as: Any) -> None:
    body = api_as(personas["compliance"]).get("/api/v1/audit/verify").json()
    assert body["ok"] is True and body["first_bad"] is None and len(body["head"]) == 64
    assert AuditEvent.objects.filter(action="audit.verify", actor_username="casey").exists()


AUDIT_ENDPOINTS = ["/api/v1/audit/events", "/api/v1/audit/verify"]
ROLE_STATUS = {None: 401, "outsider": 403, "viewer": 403, "ds": 403, "approver1": 403, "compliance": 200,
               "admin": 200}


@pytest.mark.parametrize("persona", list(ROLE_STATUS), ids=[str(p) for p in ROLE_STATUS])
@pytest.mark.parametrize("path", AUDIT_ENDPOINTS)
def test_audit_endpoints_per_role(personas: dict[str, Any], api_as: Any, persona: str | None, path: str) -> None:
    client = api_as(personas[persona] if persona else None)
    response = client.get(path)
    assert response.status_code == ROLE_STATUS[persona]
    if response.status_code != 200:
        assert_error_shape(response, ROLE_STATUS[persona])


@pytest.mark.parametrize("persona", [None, "outsider", "viewer", "ds", "approver1", "compliance", "admin"])
def test_me_and_tokens_per_role(personas: dict[str, Any], api_as: Any, persona: str | None) -> None:
    client = api_as(personas[persona] if persona else None)
    expected = 401 if persona is None else 200
    assert client.get("/api/v1/me").status_code == expected
    assert client.get("/api/v1/tokens/").status_code == expected


def test_a_nul_in_the_address_is_a_400_not_a_database_error(client: Any, personas: dict[str, Any]) -> None:
    client.force_login(personas["ds"])
    api = client.get("/api/v1/alerts/", {"environment": "dev\x00"})
    assert api.status_code == 400 and "NUL character" in api.json()["error"]["message"]
    page = client.get("/models/?search=a%00b")
    assert page.status_code == 400 and b"NUL character" in page.content
