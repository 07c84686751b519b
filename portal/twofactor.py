"""TOTP two-factor authentication for the sensitive roles (approvers, compliance officers, administrators).

With ``PORTAL_REQUIRE_2FA`` on, a member of those roles who signed in with a password reaches nothing but the
enrolment and verification pages until they give a code from their authenticator app (or one of their ten
single-use recovery codes). Enrolment and every failed code are audit events. API tokens are unaffected: they are
created from a verified session and are revocable.
"""

from __future__ import annotations

import base64
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render, resolve_url
from django.views.decorators.http import require_http_methods
from django_otp import login as otp_login
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from portal.api.errors import json_error_response
from portal.audit.actions import AuditAction
from portal.audit.record import audit_record
from portal.models import AuditOutcome
from portal.roles import ADMIN, APPROVER, COMPLIANCE_OFFICER, roles_of
from portal.views import safe_next_url

SENSITIVE_ROLES = {APPROVER, COMPLIANCE_OFFICER, ADMIN}
EXEMPT_PREFIXES = ("/login/", "/logout/", "/account/2fa/", "/static/", "/healthz", "/readyz", "/favicon")
RECOVERY_CODES = 10


def needs_second_factor(user: Any) -> bool:
    return bool(settings.PORTAL_REQUIRE_2FA and getattr(user, "is_authenticated", False)
                and (user.is_superuser or SENSITIVE_ROLES & set(roles_of(user))))


def is_verified(request: HttpRequest) -> bool:
    check = getattr(request.user, "is_verified", None)
    return bool(check and check())


class TwoFactorMiddleware:
    """After django-otp's middleware: keep unverified members of the sensitive roles on the 2FA pages."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if (needs_second_factor(request.user) and not is_verified(request)
                and not request.path.startswith(EXEMPT_PREFIXES)):
            if request.path.startswith("/api/"):
                return json_error_response(request, 403, "two_factor_required",
                                           "Your role needs a second factor: finish signing in at /account/2fa/.")
            has_device = TOTPDevice.objects.filter(user=request.user, confirmed=True).exists()
            target = "portal:2fa-verify" if has_device else "portal:2fa-enroll"
            from django.urls import reverse

            return redirect(f"{reverse(target)}?next={request.get_full_path()}")
        return self.get_response(request)


def _next(request: HttpRequest) -> str:
    return safe_next_url(request) or resolve_url(settings.LOGIN_REDIRECT_URL)  # a path: templates link to it


def _failed(request: HttpRequest, step: str) -> None:
    audit_record(AuditAction.TWOFA_FAILURE, actor=request.user, outcome=AuditOutcome.FAILURE,
                 metadata={"step": step})


@login_required
@require_http_methods(["GET", "POST"])
def enroll(request: HttpRequest) -> HttpResponse:
    if TOTPDevice.objects.filter(user=request.user, confirmed=True).exists():
        return redirect("portal:2fa-verify")
    device = TOTPDevice.objects.filter(user=request.user, confirmed=False).first() or TOTPDevice.objects.create(
        user=request.user, name="authenticator", confirmed=False)
    status = 200
    error = ""
    if request.method == "POST":
        code = request.POST.get("code", "").strip().replace(" ", "")
        allowed, _why = device.verify_is_allowed()
        if allowed and code.isdigit() and device.verify_token(code):
            with transaction.atomic():
                device.confirmed = True
                device.save(update_fields=["confirmed"])
                StaticDevice.objects.filter(user=request.user).delete()
                recovery = StaticDevice.objects.create(user=request.user, name="recovery codes")
                codes = [StaticToken.random_token() for _ in range(RECOVERY_CODES)]
                for code in codes:
                    recovery.token_set.create(token=code)
                audit_record(AuditAction.TWOFA_ENROLL, actor=request.user,
                             metadata={"device": "totp", "recovery_codes": RECOVERY_CODES})
            otp_login(request, device)
            return render(request, "portal/2fa_recovery.html", {"codes": codes, "next": _next(request)})
        _failed(request, "enroll")
        error, status = ("That code is not right. Check the time on your phone and try the current code." if allowed
                         else "Too many wrong codes; wait a few seconds and try again."), 400 if allowed else 429
    key = base64.b32encode(device.bin_key).decode()
    return render(request, "portal/2fa_enroll.html", {
        "key": " ".join(key[i:i + 4] for i in range(0, len(key), 4)), "config_url": device.config_url,
        "error": error, "next": _next(request)}, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def verify(request: HttpRequest) -> HttpResponse:
    totp = TOTPDevice.objects.filter(user=request.user, confirmed=True).first()
    if totp is None:
        return redirect("portal:2fa-enroll")
    status, error = 200, ""
    if request.method == "POST":
        code = request.POST.get("code", "").strip().replace(" ", "")
        allowed, _why = totp.verify_is_allowed()
        device: Any = None
        if code.isdigit() and len(code) == 6 and allowed and totp.verify_token(code):
            device = totp
        else:
            for recovery in StaticDevice.objects.filter(user=request.user):
                if recovery.verify_token(code.lower()):
                    device = recovery
        if device is not None:
            otp_login(request, device)
            return redirect(_next(request))
        _failed(request, "verify")
        error = ("Too many wrong codes; wait a little and try again." if not allowed
                 else "That code is not right. Use the current code from your app, or a recovery code.")
        status = 400 if allowed else 429
    return render(request, "portal/2fa_verify.html", {"error": error, "next": _next(request)}, status=status)
