"""Background work of the portal app. Tasks are thin: restore the request context, call a service."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

import redis
from celery import shared_task
from django.db import InterfaceError, OperationalError
from django.dispatch import receiver
from kombu.exceptions import OperationalError as BrokerUnreachable

from portal import context
from portal.audit.checkpoints import audit_checkpoint_create, audit_checkpoint_send, checkpoint_to_send
from portal.audit.verify import audit_chain_verify
from portal.webhooks import deliveries_queued, webhook_deliver

logger = logging.getLogger(__name__)

# A database or broker that is restarting: the task runs again after 2, 4, 8… (at most 30) seconds, up to 8 times.
# Only for tasks whose service claims its row first, so that running again is safe.
TRANSIENT_ERRORS = (InterfaceError, OperationalError, BrokerUnreachable, redis.ConnectionError, redis.TimeoutError)
RETRY_TRANSIENT: dict[str, Any] = {"autoretry_for": TRANSIENT_ERRORS, "retry_backoff": 2, "retry_backoff_max": 30,
                                   "retry_jitter": False, "max_retries": 8}


def with_request_context(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a task under the request context it was enqueued from (``request_ctx=ctx.as_task_kwargs()``)."""

    @wraps(func)
    def wrapper(*args: Any, request_ctx: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        ctx = context.RequestContext(**(request_ctx or {}))
        if not ctx.request_id:
            ctx = context.RequestContext(request_id=context.new_request_id(), ip=ctx.ip, user_agent=ctx.user_agent)
        with context.bound(ctx):
            return func(*args, **kwargs)

    return wrapper


@shared_task(name="portal.tasks.audit_chain_verify")
@with_request_context
def audit_chain_verify_task() -> dict[str, Any]:
    """Scheduled by beat: a broken chain, or one that disagrees with its checkpoints, is found within a day, not
    when an auditor asks."""
    verdict = audit_chain_verify(actor=None, source="beat")
    if not verdict.ok:
        logger.error("Audit chain broken at event #%s: %s", verdict.first_bad, verdict.reason)
    return verdict.as_dict()


@shared_task(name="portal.tasks.audit_checkpoint", **RETRY_TRANSIENT)
@with_request_context
def audit_checkpoint_task() -> dict[str, Any] | None:
    """Scheduled by beat every PORTAL_AUDIT_CHECKPOINT_MINUTES: the chain's head, signed, into the store."""
    checkpoint = audit_checkpoint_create(reason="scheduled")
    return checkpoint.summary() if checkpoint else None


@shared_task(name="portal.tasks.audit_checkpoint_send", bind=True, max_retries=12)
def audit_checkpoint_send_task(self: Any, name: str) -> int:
    """Hand one checkpoint to the compliance webhook; a failure comes back after 30 s, 1, 2, 4… minutes (at most
    an hour apart), for about half a day."""
    try:
        return audit_checkpoint_send(name=name)
    except OSError as exc:  # urllib's HTTPError and URLError are OSErrors
        logger.warning("Audit checkpoint %s not delivered to the compliance webhook: %s", name, exc)
        raise self.retry(countdown=min(3600, 30 * 2 ** self.request.retries), exc=exc) from exc


@shared_task(name="portal.tasks.webhook_deliver", bind=True, max_retries=None)
def webhook_deliver_task(self: Any, delivery_id: int) -> str:
    """One delivery attempt; a retryable failure comes back after an exponential backoff."""
    status, retry_in = webhook_deliver(delivery_id=delivery_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)
    return status


@receiver(deliveries_queued, dispatch_uid="portal.tasks.webhook_deliver")
def _deliveries_queued(*, delivery_ids: list[int], **_: Any) -> None:
    for pk in delivery_ids:
        webhook_deliver_task.delay(pk)


@receiver(checkpoint_to_send, dispatch_uid="portal.tasks.audit_checkpoint_send")
def _checkpoint_to_send(*, name: str, **_: Any) -> None:
    audit_checkpoint_send_task.delay(name)


@shared_task(name="portal.tasks.send_email")
def send_email_task(subject: str, body: str, recipients: list[str]) -> int:
    from django.core.mail import send_mail

    return send_mail(subject, body, None, recipients, fail_silently=False)
