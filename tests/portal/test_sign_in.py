"""Signing in and out, lockout, idle timeout: each an audit event, each with a message a person understands."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client, override_settings
from django.urls import reverse

from portal.models import AuditEvent
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def _actions() -> list[str]:
    return list(AuditEvent.objects.order_by("seq").values_list("action", flat=True))


def test_the_login_page_is_the_portals_own(client: Client) -> None:
    response = client.get(reverse("portal:login"))
    assert response.status_code == 200
    assert b"Sign in" in response.content and b"csrfmiddlewaretoken" in response.content
    assert "Content-Security-Policy" in response.headers


def test_signing_in_records_an_event_with_the_request_id(client: Client, personas: dict[str, Any]) -> None:
    response = client.post(reverse("portal:login"), {"username": "dana", "password": PASSWORD},
                           HTTP_X_REQUEST_ID="click-0001-abcdef", HTTP_USER_AGENT="pytest-browser")
    assert response.status_code == 302 and response.headers["Location"] == reverse("portal:home")
    event = AuditEvent.objects.get(action="auth.login")
    assert (event.actor_username, event.request_id, event.user_agent, event.ip) == (
        "dana", "click-0001-abcdef", "pytest-browser", "127.0.0.1")


def test_a_wrong_password_is_refused_and_recorded(client: Client, personas: dict[str, Any]) -> None:
    response = client.post(reverse("portal:login"), {"username": "dana", "password": "nope"})
    assert response.status_code == 200
    assert b"Wrong username or password." in response.content
    event = AuditEvent.objects.get(action="auth.login_failed")
    assert (event.actor_username, event.outcome) == ("dana", "failure")


def test_an_empty_form_gets_field_errors_not_a_crash(client: Client) -> None:
    response = client.post(reverse("portal:login"), {})
    assert response.status_code == 400
    assert b"This field is required." in response.content


@override_settings(AXES_FAILURE_LIMIT=3)
def test_repeated_failures_lock_the_account_even_with_the_right_password(client: Client,
                                                                         personas: dict[str, Any]) -> None:
    for _ in range(2):
        assert client.post(reverse("portal:login"), {"username": "dana", "password": "nope"}).status_code == 200
    locked = client.post(reverse("portal:login"), {"username": "dana", "password": "nope"})
    assert locked.status_code == 429
    assert b"Too many failed sign-ins" in locked.content
    still_locked = client.post(reverse("portal:login"), {"username": "dana", "password": PASSWORD})
    assert still_locked.status_code == 429
    assert "_auth_user_id" not in client.session
    assert _actions().count("auth.locked_out") == 2


def test_signing_out_needs_a_post_and_is_recorded(client: Client, personas: dict[str, Any]) -> None:
    client.force_login(personas["ds"])
    assert client.get(reverse("portal:logout")).status_code == 405
    response = client.post(reverse("portal:logout"))
    assert response.status_code == 302
    assert "auth.logout" in _actions()
    assert client.get(reverse("portal:home")).status_code == 302


def test_an_idle_session_is_signed_out_with_an_explanation(client: Client, personas: dict[str, Any]) -> None:
    client.force_login(personas["ds"])
    assert client.get(reverse("portal:home")).status_code == 200
    session = client.session
    session["portal_last_seen"] = int(time.time()) - 31 * 60
    session.save()
    response = client.get(reverse("portal:home"), follow=True)
    assert response.redirect_chain[-1][0].startswith(reverse("portal:login"))
    assert b"signed out after a period of inactivity" in response.content
    assert "auth.session_expired" in _actions()


def test_next_is_followed_only_to_our_own_pages(client: Client, personas: dict[str, Any]) -> None:
    evil = client.post(reverse("portal:login") + "?next=https://evil.example/",
                       {"username": "dana", "password": PASSWORD})
    assert evil.headers["Location"] == reverse("portal:home")
    client.logout()
    ok = client.post(reverse("portal:login") + "?next=/account/", {"username": "dana", "password": PASSWORD})
    assert ok.headers["Location"] == "/account/"


EXPECTED_NAV = {
    "ds": {"Home", "Models", "Promotions", "Endpoints", "Monitoring", "API docs", "Account"},
    "approver1": {"Home", "Models", "Promotions", "Endpoints", "Monitoring", "API docs", "Account"},
    "compliance": {"Home", "Models", "Promotions", "Endpoints", "Monitoring", "Audit trail", "Data subjects", "API docs", "Account"},
    "admin": {"Home", "Models", "Promotions", "Endpoints", "Monitoring", "MLflow", "Audit trail", "Data subjects", "API docs", "Account", "Administration"},
    "viewer": {"Home", "Models", "Promotions", "Endpoints", "Monitoring", "API docs", "Account"},
}


@pytest.mark.parametrize("persona", sorted(EXPECTED_NAV))
def test_navigation_shows_each_role_what_it_may_do(client: Client, personas: dict[str, Any], persona: str) -> None:
    client.force_login(personas[persona])
    response = client.get(reverse("portal:home"))
    nav = {entry["label"] for entry in response.context["nav_entries"]}
    assert nav == EXPECTED_NAV[persona]
