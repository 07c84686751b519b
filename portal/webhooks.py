"""Outgoing webhooks: URL validation that refuses internal targets, HMAC-signed delivery, retries with backoff.

A URL is checked twice: when it is saved (scheme, no credentials, a port in ``PORTAL_WEBHOOK_PORTS``, a literal IP
outside every special-purpose block of ``portal.special_addresses``) and at every delivery, after DNS resolution.
The delivery then connects to the very address that was checked, so a name that resolves to a public address at
check time and to 127.0.0.1 a moment later (DNS rebinding) cannot reach inside.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.db import transaction
from django.dispatch import Signal
from django.utils import timezone

from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from portal.models import TeamWebhook, WebhookDelivery
from portal.permissions import require_capability
from portal.webhook_policy import sign, validate_webhook_url

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 6
TIMEOUT_SECONDS = 5.0

# Sent once the transaction that queued deliveries commits (``delivery_ids``); portal.tasks enqueues one delivery
# task for each. A signal, so that this module needs nothing of the task module that imports it.
deliveries_queued = Signal()
class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def post_signed(url: str, secret: str, event: str, delivery_id: str, payload: dict[str, Any]) -> int:
    """POST ``payload`` to ``url`` (validated again, connected to the address that was checked). Returns the HTTP
    status; raises ValidationError for a refused target and OSError for network trouble. Redirects are not
    followed."""
    host, port, addresses = validate_webhook_url(url)
    parts = urlsplit(url)
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "mlops-portal-webhooks",
               "X-Portal-Event": event, "X-Portal-Delivery": delivery_id, "X-Portal-Timestamp": timestamp,
               "X-Portal-Signature": sign(secret, timestamp, body)}
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = _PinnedHTTPSConnection(host, addresses[0], port, timeout=TIMEOUT_SECONDS,
                                      context=ssl.create_default_context())
    else:
        conn = _PinnedHTTPConnection(host, addresses[0], port, timeout=TIMEOUT_SECONDS)
    try:
        conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
        response = conn.getresponse()
        response.read(65536)
        return response.status
    finally:
        conn.close()


def webhooks_notify(*, team: Any, event: str, payload: dict[str, Any]) -> list[Any]:
    """Queue ``event`` for every active webhook of ``team`` that wants it, once the transaction commits."""
    deliveries = []
    for hook in team.webhooks.filter(active=True):
        if hook.events and event not in hook.events:
            continue
        deliveries.append(WebhookDelivery.objects.create(webhook=hook, event=event, payload=payload))
    if deliveries:
        ids = [d.pk for d in deliveries]
        transaction.on_commit(lambda: deliveries_queued.send(sender=WebhookDelivery, delivery_ids=ids))
    return deliveries


def backoff_seconds(attempt: int) -> int:
    """2, 4, 8, 16, 32 seconds... capped at ten minutes."""
    return int(min(600, 2 ** attempt))


def webhook_deliver(*, delivery_id: int) -> tuple[str, int | None]:
    """Attempt one delivery. Returns (status, seconds until the next attempt or None)."""
    delivery = WebhookDelivery.objects.select_related("webhook").filter(pk=delivery_id).first()
    if delivery is None or delivery.status in (WebhookDelivery.Status.DELIVERED, WebhookDelivery.Status.FAILED):
        return ("gone" if delivery is None else delivery.status), None
    delivery.attempts += 1
    delivery.last_attempt_at = timezone.now()
    retry: int | None = None
    try:
        code = post_signed(delivery.webhook.url, delivery.webhook.secret, delivery.event, str(delivery.uid),
                           delivery.payload)
        delivery.response_status = code
        if 200 <= code < 300:
            delivery.status, delivery.error, delivery.delivered_at = (WebhookDelivery.Status.DELIVERED, "",
                                                                      timezone.now())
        else:
            delivery.error = f"the receiver answered HTTP {code}"
            permanent = 400 <= code < 500 and code not in (408, 429)
            retry = None if permanent else backoff_seconds(delivery.attempts)
    except ValidationError as exc:
        delivery.error = " ".join(exc.messages)  # a refused target is not retried
    except (OSError, http.client.HTTPException) as exc:
        delivery.error = f"{type(exc).__name__}: {exc}"[:1000]
        retry = backoff_seconds(delivery.attempts)
    if delivery.status != WebhookDelivery.Status.DELIVERED:
        if retry is not None and delivery.attempts < MAX_ATTEMPTS:
            delivery.status = WebhookDelivery.Status.RETRYING
        else:
            delivery.status, retry = WebhookDelivery.Status.FAILED, None
            logger.warning("Webhook delivery %s failed for good: %s", delivery.uid, delivery.error)
    delivery.save(update_fields=["attempts", "last_attempt_at", "response_status", "status", "error",
                                 "delivered_at"])
    return delivery.status, retry


# What a team's webhook may subscribe to (none: everything); the services that send them name the same events.
WEBHOOK_EVENTS = ("promotion.requested", "promotion.approved", "promotion.rejected", "promotion.live",
                  "promotion.failed", "environment.rollback", "experiment.verdict", "retraining.requested")


def webhook_create(*, team: Any, url: str, secret: str, actor: Any, events: list[str] | None = None,
                   active: bool = True) -> Any:
    """Add a webhook to ``team`` after checking its URL, resolution included (refused targets are a 400)."""
    require_capability(actor, "manage_teams")
    try:
        validate_webhook_url(url)
    except ValidationError as exc:
        raise ValidationError({"url": exc.messages}) from exc
    with transaction.atomic():
        hook = TeamWebhook.objects.create(team=team, url=url, secret=secret, events=events or [], active=active,
                                          created_by=actor)
        audit_record(AuditAction.WEBHOOK_CREATE, actor=actor,
                     target=Target("webhook", str(hook.pk), url, team.slug),
                     after={"url": url, "events": hook.events, "active": active})
    return hook
