"""TOTP two-factor sign-in for approvers, compliance officers and admins, when PORTAL_REQUIRE_2FA is on."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from django.test import Client
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice

from portal.models import AuditEvent
from tests.conftest import PASSWORD


def _sign_in(username: str) -> Client:
    client = Client()
    response = client.post("/login/", {"username": username, "password": PASSWORD})
    assert response.status_code == 302, response.content[:300]
    return client


def _code(device: TOTPDevice, offset: int = 0) -> str:
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time() + offset
    return f"{totp.token():06d}"


def test_an_approver_must_enroll_then_give_a_code_at_every_sign_in(personas: dict[str, Any], settings: Any) -> None:
    settings.PORTAL_REQUIRE_2FA = True
    client = _sign_in("alex")
    response = client.get("/promotions/")
    assert response.status_code == 302 and response["Location"].startswith("/account/2fa/enroll?next=/promotions/")
    api = client.get("/api/v1/promotions/")
    assert api.status_code == 403 and api.json()["error"]["code"] == "two_factor_required"
    page = client.get("/account/2fa/enroll")
    assert b'data-testid="totp-key"' in page.content
    device = TOTPDevice.objects.get(user=personas["approver1"])
    wrong = client.post("/account/2fa/enroll", {"code": "000000" if _code(device) != "000000" else "111111"})
    assert wrong.status_code == 400
    assert AuditEvent.objects.filter(action="auth.2fa_failure", actor=personas["approver1"]).count() == 1
    time.sleep(1.1)  # django-otp throttles: after a wrong code the next is accepted only a second later
    done = client.post("/account/2fa/enroll", {"code": _code(device), "next": "/promotions/"})
    codes = re.findall(r"<li><code>([a-z0-9]+)</code></li>", done.content.decode())
    assert done.status_code == 200 and len(codes) == 10
    assert AuditEvent.objects.filter(action="auth.2fa_enroll", actor=personas["approver1"]).count() == 1
    assert client.get("/promotions/").status_code == 200

    again = _sign_in("alex")
    response = again.get("/promotions/")
    assert response["Location"].startswith("/account/2fa/verify")
    assert again.post("/account/2fa/verify", {"code": "12345x"}).status_code == 400
    time.sleep(1.1)
    assert again.post("/account/2fa/verify", {"code": codes[0], "next": "/promotions/"})["Location"] == "/promotions/"
    assert again.get("/promotions/").status_code == 200
    reused = _sign_in("alex")
    assert reused.post("/account/2fa/verify", {"code": codes[0]}).status_code == 400, "recovery codes work once"
    time.sleep(1.1)
    device.refresh_from_db()
    ok = reused.post("/account/2fa/verify", {"code": _code(device, offset=30), "next": "/audit/"})
    assert ok.status_code == 302 and ok["Location"] == "/audit/"


@pytest.mark.parametrize("persona,required", [("ds", False), ("viewer", False), ("approver1", True),
                                              ("compliance", True), ("admin", True)])
def test_who_needs_a_second_factor(personas: dict[str, Any], settings: Any, persona: str, required: bool) -> None:
    settings.PORTAL_REQUIRE_2FA = True
    client = _sign_in(personas[persona].username)
    response = client.get("/")
    assert (response.status_code == 302) == required
    settings.PORTAL_REQUIRE_2FA = False
    assert client.get("/").status_code == 200


def test_bearer_tokens_are_not_held_up(personas: dict[str, Any], settings: Any, api_as: Any) -> None:
    settings.PORTAL_REQUIRE_2FA = True
    assert api_as(personas["approver1"]).get("/api/v1/promotions/").status_code == 200
