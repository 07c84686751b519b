"""Request id and client context, security headers, and the idle session timeout."""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth import logout
from django.http import HttpRequest, HttpResponse

from portal import context
from portal.api.errors import json_error_response
from portal.services import session_expire

Handler = Callable[[HttpRequest], HttpResponse]


def client_ip(request: HttpRequest) -> str | None:
    """REMOTE_ADDR, or the address the trusted proxies in front of us saw (PORTAL_TRUSTED_PROXY_COUNT)."""
    candidate: str | None = request.META.get("REMOTE_ADDR")
    hops = settings.PORTAL_TRUSTED_PROXY_COUNT
    if hops:
        forwarded = [p.strip() for p in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if p.strip()]
        if len(forwarded) >= hops:
            candidate = forwarded[-hops]
    return _normal_ip(candidate) if candidate else None


@functools.lru_cache(maxsize=1024)
def _normal_ip(candidate: str) -> str | None:
    """An address in its canonical form, remembered: parsing it afresh cost each scoring request several us."""
    try:
        return ipaddress.ip_address(candidate).compressed
    except ValueError:
        return None


NUL_MESSAGE = "The address contains a NUL character (%00), which no name, id or filter can hold; remove it."


def _nul_refusal(request: HttpRequest) -> HttpResponse | None:
    """A NUL in the path or query string cannot reach a database (PostgreSQL text refuses it): a 400 up front."""
    query = request.META.get("QUERY_STRING", "")
    if "%00" not in query and "\x00" not in query and "\x00" not in request.path:
        return None
    if request.path.startswith("/api/"):
        return json_error_response(request, 400, "invalid_request", NUL_MESSAGE)
    return HttpResponse(NUL_MESSAGE, status=400, content_type="text/plain; charset=utf-8")


def request_context(request: HttpRequest) -> context.RequestContext:
    return context.RequestContext(
        request_id=context.new_request_id(request.META.get("HTTP_X_REQUEST_ID")),
        ip=client_ip(request),
        user_agent=request.META.get("HTTP_USER_AGENT", "")[:512],
    )


class RequestContextMiddleware:
    """Give every request an id (kept from a sane incoming X-Request-ID) and echo it in the response."""

    def __init__(self, get_response: Handler) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        ctx = request_context(request)
        request.request_id = ctx.request_id  # type: ignore[attr-defined]
        with context.bound(ctx):
            response = _nul_refusal(request) or self.get_response(request)
        response["X-Request-ID"] = ctx.request_id
        return response


CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        # Plotly sets inline style attributes on the charts it draws; scripts stay strictly same-origin.
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class SecurityHeadersMiddleware:
    def __init__(self, get_response: Handler) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return add_security_headers(request, self.get_response(request))


def add_security_headers(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    response.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=()")
    response.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    if request.path.startswith("/api/") or (getattr(request, "user", None) and request.user.is_authenticated):
        # Pages with a user's data must not linger in shared caches or the back button of a shared machine.
        response.setdefault("Cache-Control", "no-store")
    return response


class IdleSessionTimeoutMiddleware:
    """Sign out a browser session idle for longer than PORTAL_SESSION_IDLE_MINUTES.

    The last-seen time is written at most once a minute so that a busy page does not save the session each request.
    """

    KEY = "portal_last_seen"

    def __init__(self, get_response: Handler) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        user: Any = getattr(request, "user", None)
        if user is not None and user.is_authenticated and hasattr(request, "session"):
            now = int(time.time())
            last_seen = request.session.get(self.KEY)
            if isinstance(last_seen, int) and now - last_seen > settings.SESSION_IDLE_SECONDS:
                session_expire(request=request, user=user, idle_seconds=now - last_seen)
                logout(request)
                request.session["portal_expired"] = True
            elif not isinstance(last_seen, int) or now - last_seen >= 60:
                request.session[self.KEY] = now
        return self.get_response(request)
