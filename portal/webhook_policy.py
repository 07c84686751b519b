"""What a webhook may reach and how its body is signed: the URL checks (scheme, no credentials, a port in
``PORTAL_WEBHOOK_PORTS``, no internal host, every resolved address public) and the HMAC signature.

Below the models (a webhook URL's field validator), the audit checkpoints (signed like every webhook) and delivery
(``portal.webhooks``), none of which it imports.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError

from portal import special_addresses

# Cloud metadata endpoints that are not covered by the link-local and private checks on every platform.
METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"}


def _address_refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    return special_addresses.refusal(address)


def resolve_public(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, provided all are public; ValidationError otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValidationError(f"The webhook's host {host!r} does not resolve ({exc}).") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    for raw in addresses:
        refusal = _address_refusal(ipaddress.ip_address(raw.split("%")[0]))
        if refusal:
            raise ValidationError(f"The webhook's host {host!r} resolves to {raw}, {refusal}; webhooks may only "
                                  "reach public addresses.")
    return addresses


def validate_webhook_url(url: str, *, resolve: bool = True) -> tuple[str, int, list[str]]:
    """Check a webhook URL; with ``resolve``, also that every address of its host is public. Returns the host,
    the port and the addresses to connect to."""
    parts = urlsplit(url)
    allowed = {"https", "http"} if settings.PORTAL_WEBHOOK_ALLOW_HTTP else {"https"}
    if parts.scheme not in allowed:
        raise ValidationError(f"Webhook URLs must use {' or '.join(sorted(allowed))}.")
    if parts.username or parts.password:
        raise ValidationError("Put no credentials in a webhook URL; the payload is signed with the webhook's secret.")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise ValidationError("The webhook URL has no host.")
    if host in METADATA_HOSTS or host == "localhost" or host.endswith((".localhost", ".internal", ".local")):
        raise ValidationError(f"The webhook's host {host!r} is internal; webhooks may only reach public addresses.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise ValidationError("The webhook URL's port is not a number between 1 and 65535.") from exc
    if port not in settings.PORTAL_WEBHOOK_PORTS:
        allowed_ports = ", ".join(str(p) for p in settings.PORTAL_WEBHOOK_PORTS)
        raise ValidationError(f"Webhook URLs may use port {allowed_ports} only (PORTAL_WEBHOOK_PORTS); this one uses "
                              f"{port}.")
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        refusal = _address_refusal(literal)
        if refusal:
            raise ValidationError(f"The webhook URL points at {host}, {refusal}; webhooks may only reach public "
                                  "addresses.")
        return host, port, [str(literal)]
    if not resolve:
        return host, port, []
    return host, port, resolve_public(host, port)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"
