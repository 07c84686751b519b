"""The audit spine: every state change records one event here, inside the transaction that makes the change.

The trail is a hash chain. For event n::

    hash_n = sha256_hex(prev_hash + canonical_json(event_n))      prev_hash = hash_(n-1), or 64 zeros for n = 1

``canonical_json`` is ``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` of the dict
built by :func:`event_document`, so anyone can recompute it with the standard library alone.

Writers are serialised through the single ``AuditChainHead`` row: a writer first *updates* that row (which takes
PostgreSQL's row lock, or SQLite's write lock), so two transactions can never read the same head and fork the chain.
The lock is held until the surrounding transaction commits, so services record their event last.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from portal import context
from portal.audit.actions import AuditAction
from portal.models import AuditChainHead, AuditEvent, AuditOutcome

GENESIS_HASH = "0" * 64


def canonical_json(document: dict[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _normalise(value: Any) -> Any:
    """What the JSON column will give back when read, so the hash computed now matches the one verified later.

    PostgreSQL's jsonb keeps numbers as numerics: a float such as 1e16 comes back as the integer
    10000000000000000, so integral floats that large are stored as integers to begin with; NaN and infinities are
    not JSON and become strings."""
    if value is None:
        return None
    return _jsonb_numbers(json.loads(json.dumps(value, default=str).replace("\\u0000", "")))


def _jsonb_numbers(value: Any) -> Any:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value.is_integer() and abs(value) >= 1e16:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: _jsonb_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonb_numbers(v) for v in value]
    return value


def _timestamp_text(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_document(
    *,
    seq: int,
    timestamp: datetime,
    actor_username: str,
    action: str,
    action_code: int,
    target_type: str,
    target_id: str,
    target_repr: str,
    team_slug: str,
    before: Any,
    after: Any,
    metadata: Any,
    request_id: str,
    ip: str | None,
    user_agent: str,
    outcome: str,
) -> dict[str, Any]:
    return {
        "seq": seq,
        "timestamp": _timestamp_text(timestamp),
        "actor": actor_username,
        "action": action,
        "action_code": action_code,
        "target_type": target_type,
        "target_id": target_id,
        "target_repr": target_repr,
        "team": team_slug,
        "before": before,
        "after": after,
        "metadata": metadata,
        "request_id": request_id,
        "ip": ip,
        "user_agent": user_agent,
        "outcome": outcome,
    }


def chain_hash(prev_hash: str, document: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical_json(document)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Target:
    type: str
    id: str
    repr: str = ""
    team_slug: str = ""


def target_of(obj: Any, *, team_slug: str = "") -> Target:
    """A Target for a model instance: its lowercase model name, primary key and str()."""
    meta = obj._meta
    return Target(type=meta.model_name, id=str(getattr(obj, "uid", None) or obj.pk), repr=str(obj)[:255], team_slug=team_slug)


def audit_record(
    action: AuditAction,
    *,
    actor: AbstractBaseUser | AnonymousUser | None,
    target: Target | None = None,
    before: Any = None,
    after: Any = None,
    metadata: dict[str, Any] | None = None,
    outcome: str = AuditOutcome.SUCCESS,
    actor_username: str | None = None,
) -> AuditEvent:
    """Append one event to the chain inside the caller's transaction (or its own, when there is none).

    ``actor_username`` overrides the copied name, for events without a user row (a failed login's attempted name).
    """
    ctx = context.current()
    user = actor if (actor is not None and getattr(actor, "is_authenticated", False)) else None
    username = actor_username if actor_username is not None else (user.get_username() if user else "")
    tgt = target or Target(type="", id="")
    before_n, after_n, meta_n = _normalise(before), _normalise(after), _normalise(metadata or {})
    ts = timezone.now()

    with transaction.atomic():
        # Taking the head row's lock *before* reading it is what keeps concurrent writers in one line.
        if not AuditChainHead.objects.filter(pk=1).update(seq=F("seq") + 1):
            _restore_head()
            AuditChainHead.objects.filter(pk=1).update(seq=F("seq") + 1)
        head = AuditChainHead.objects.get(pk=1)
        prev_hash = head.hash
        document = event_document(
            seq=head.seq,
            timestamp=ts,
            actor_username=username[:150],
            action=action.label,
            action_code=action.code,
            target_type=tgt.type[:64],
            target_id=tgt.id[:128],
            target_repr=tgt.repr[:255],
            team_slug=tgt.team_slug[:64],
            before=before_n,
            after=after_n,
            metadata=meta_n,
            request_id=ctx.request_id,
            ip=ctx.ip,
            user_agent=ctx.user_agent[:512],
            outcome=str(outcome),
        )
        digest = chain_hash(prev_hash, document)
        event = AuditEvent(
            seq=head.seq,
            timestamp=ts,
            actor=user,  # type: ignore[misc]
            actor_username=document["actor"],
            action=document["action"],
            action_code=action.code,
            target_type=document["target_type"],
            target_id=document["target_id"],
            target_repr=document["target_repr"],
            team_slug=document["team"],
            before=before_n,
            after=after_n,
            metadata=meta_n,
            request_id=document["request_id"],
            ip=document["ip"],
            user_agent=document["user_agent"],
            outcome=document["outcome"],
            prev_hash=prev_hash,
            hash=digest,
        )
        event.save(force_insert=True)
        AuditChainHead.objects.filter(pk=1).update(hash=digest)
    return event


def _restore_head() -> None:
    """Recreate a missing head row (a database flushed by a test or restored without it) from the newest event."""
    newest = AuditEvent.objects.order_by("-seq").values("seq", "hash").first()
    AuditChainHead.objects.get_or_create(
        pk=1, defaults={"seq": newest["seq"], "hash": newest["hash"]} if newest else {"seq": 0, "hash": GENESIS_HASH}
    )
