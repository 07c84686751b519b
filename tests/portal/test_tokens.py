"""Personal API tokens: shown once, stored hashed, listed, revocable, and accepted as Bearer credentials."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from portal.models import ApiToken, AuditEvent
from tests.conftest import PASSWORD, assert_error_shape

pytestmark = pytest.mark.django_db


def test_a_token_is_shown_once_and_stored_only_as_a_hash(personas: dict[str, Any]) -> None:
    client = APIClient()
    client.force_authenticate(personas["ds"])
    created = client.post("/api/v1/tokens/", {"name": "ci", "expires_in_days": 30}, format="json")
    assert created.status_code == 201
    plaintext = created.json()["token"]
    row = ApiToken.objects.get(name="ci")
    assert row.key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    assert plaintext not in str(ApiToken.objects.filter(pk=row.pk).values().get())
    listed = client.get("/api/v1/tokens/").json()
    assert listed[0]["name"] == "ci" and "token" not in listed[0]
    event = AuditEvent.objects.get(action="token.create")
    assert plaintext not in str(event.after) and event.after["prefix"] == plaintext[:12]


def test_bearer_tokens_authenticate_and_revoked_ones_do_not(personas: dict[str, Any]) -> None:
    session = APIClient()
    session.force_authenticate(personas["ds"])
    body = session.post("/api/v1/tokens/", {"name": "pipeline"}, format="json").json()
    bearer = APIClient()
    bearer.credentials(HTTP_AUTHORIZATION=f"Bearer {body['token']}")
    me = bearer.get("/api/v1/me")
    assert me.status_code == 200 and me.json()["username"] == "dana"
    assert me.json()["roles"] == ["data_scientist"] and me.json()["teams"] == ["acme"]
    assert session.delete(f"/api/v1/tokens/{body['id']}/").json()["is_active"] is False
    assert_error_shape(bearer.get("/api/v1/me"), 401, "authentication_failed")
    assert AuditEvent.objects.filter(action="token.revoke").count() == 1


@pytest.mark.parametrize("header", ["Bearer", "Bearer a b", "Bearer mlp_unknown", "Bearer \u00e9t\u00e9"])
def test_malformed_or_unknown_tokens_get_401_json(header: str, personas: dict[str, Any]) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header.encode("utf-8").decode("latin-1"))
    assert_error_shape(client.get("/api/v1/me"), 401)


def test_an_expired_token_is_refused(personas: dict[str, Any], api_as: Any) -> None:
    client = api_as(personas["ds"])
    ApiToken.objects.filter(user=personas["ds"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert_error_shape(client.get("/api/v1/me"), 401, "authentication_failed")


def test_nobody_revokes_someone_elses_token(personas: dict[str, Any], api_as: Any) -> None:
    api_as(personas["ds"])
    token = ApiToken.objects.get(user=personas["ds"])
    other = api_as(personas["approver1"])
    assert_error_shape(other.delete(f"/api/v1/tokens/{token.uid}/"), 404, "not_found")
    token.refresh_from_db()
    assert token.revoked_at is None


def test_create_token_command_prints_a_working_token(personas: dict[str, Any]) -> None:
    out = StringIO()
    call_command("create_token", "alex", "--name", "cli", stdout=out)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {out.getvalue().strip()}")
    assert client.get("/api/v1/me").json()["username"] == "alex"


def test_the_account_page_creates_lists_and_revokes_tokens(client: Client, personas: dict[str, Any]) -> None:
    client.force_login(personas["ds"])
    page = client.post(reverse("portal:account"), {"name": "notebook"})
    assert page.status_code == 200
    plaintext = page.context["new_token"]
    assert plaintext.encode() in page.content
    again = client.get(reverse("portal:account"))
    assert plaintext.encode() not in again.content and b"notebook" in again.content
    token = ApiToken.objects.get(name="notebook")
    client.post(reverse("portal:token-revoke", args=[token.uid]), follow=True)
    token.refresh_from_db()
    assert token.revoked_at is not None


def test_the_account_page_explains_a_bad_token_form(client: Client, personas: dict[str, Any]) -> None:
    client.force_login(personas["ds"])
    page = client.post(reverse("portal:account"), {"name": "", "expires_in_days": "0"})
    assert page.status_code == 400
    assert b"This field is required." in page.content
    assert not ApiToken.objects.exists()


def test_token_input_is_validated(personas: dict[str, Any]) -> None:
    client = APIClient()
    client.force_login(personas["ds"])
    body = assert_error_shape(client.post("/api/v1/tokens/", {"name": "x", "expires_in_days": 0}, format="json"),
                              400, "invalid")
    assert "expires_in_days" in body["error"]["details"]


# --- Tokens come from people, not from other tokens ----------------------------------------------------------------

@pytest.mark.parametrize("who", ["ds", "approver1", "admin"])
def test_a_bearer_token_cannot_create_tokens(personas: dict[str, Any], api_as: Any, who: str) -> None:
    """A stolen token that could mint tokens would outlive its own revocation: the API refuses, whatever the body
    (the password included), and writes nothing."""
    client = api_as(personas[who])
    before = (ApiToken.objects.count(), AuditEvent.objects.count())
    body = assert_error_shape(client.post("/api/v1/tokens/", {"name": "child", "password": PASSWORD}, format="json"),
                              403, "session_required")
    assert "signed-in session" in body["error"]["message"]
    assert (ApiToken.objects.count(), AuditEvent.objects.count()) == before
    assert client.get("/api/v1/tokens/").status_code == 200, "listing (and revoking) with a token still works"


def test_approvers_and_admins_confirm_a_new_token_with_their_password(personas: dict[str, Any]) -> None:
    for who in ("approver1", "admin"):
        session = APIClient()
        session.force_login(personas[who])
        missing = assert_error_shape(session.post("/api/v1/tokens/", {"name": "ci"}, format="json"), 403,
                                     "reauthentication_required")
        assert "needs your password" in missing["error"]["message"]
        wrong = assert_error_shape(session.post("/api/v1/tokens/", {"name": "ci", "password": "not-it-at-all"},
                                                format="json"), 403, "reauthentication_required")
        assert "not right" in wrong["error"]["message"]
        assert not ApiToken.objects.filter(user=personas[who]).exists()
        created = session.post("/api/v1/tokens/", {"name": "ci", "password": PASSWORD}, format="json")
        assert created.status_code == 201, created.content
        assert "password" not in created.json()
    failures = AuditEvent.objects.filter(action="auth.reauth_failed")
    assert failures.count() == 4 and {e.metadata["for"] for e in failures} == {"token.create"}
    assert {e.outcome for e in failures} == {"denied"}
    session = APIClient()
    session.force_login(personas["ds"])
    assert session.post("/api/v1/tokens/", {"name": "ci"}, format="json").status_code == 201, \
        "a data scientist's session needs no password"


def test_the_account_page_asks_approvers_and_admins_for_their_password(client: Client,
                                                                       personas: dict[str, Any]) -> None:
    client.force_login(personas["admin"])
    assert b'name="password"' in client.get(reverse("portal:account")).content
    page = client.post(reverse("portal:account"), {"name": "notebook"})
    assert page.status_code == 403 and b"needs your password" in page.content
    assert page.context["new_token"] is None and not ApiToken.objects.exists()
    page = client.post(reverse("portal:account"), {"name": "notebook", "password": PASSWORD})
    assert page.status_code == 200 and page.context["new_token"]
    assert PASSWORD.encode() not in page.content
    client.force_login(personas["ds"])
    assert b'name="password"' not in client.get(reverse("portal:account")).content
