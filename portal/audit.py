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

import enum
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from portal import context
from portal.models import AuditChainHead, AuditEvent, AuditOutcome

if TYPE_CHECKING:
    from portal.audit_checkpoints import TrailVerdict

GENESIS_HASH = "0" * 64


class AuditAction(enum.Enum):
    """Every auditable action, numbered in ranges per domain. Values never change once released."""

    # 1000: authentication
    AUTH_LOGIN = (1001, "auth.login")
    AUTH_LOGIN_FAILED = (1002, "auth.login_failed")
    AUTH_LOGOUT = (1003, "auth.logout")
    AUTH_LOCKED_OUT = (1004, "auth.locked_out")
    AUTH_SESSION_EXPIRED = (1005, "auth.session_expired")
    AUTH_REAUTH_FAILED = (1006, "auth.reauth_failed")
    TWOFA_ENROLL = (1007, "auth.2fa_enroll")
    TWOFA_FAILURE = (1008, "auth.2fa_failure")
    # 1100: accounts, tokens, teams
    TOKEN_CREATE = (1101, "token.create")
    TOKEN_REVOKE = (1102, "token.revoke")
    TEAM_CREATE = (1111, "team.create")
    TEAM_MEMBER_ADD = (1112, "team.member_add")
    TEAM_MEMBER_REMOVE = (1113, "team.member_remove")
    USER_CREATE = (1121, "user.create")
    USER_ROLE_CHANGE = (1122, "user.role_change")
    ADMIN_ADD = (1131, "admin.add")
    ADMIN_CHANGE = (1132, "admin.change")
    ADMIN_DELETE = (1133, "admin.delete")
    # 2000: registry
    MODEL_REGISTER = (2001, "model.register")
    MODEL_TAGS_CHANGE = (2002, "model.tags_change")
    VERSION_UPLOAD = (2011, "version.upload")
    VERSION_UPLOAD_REJECTED = (2012, "version.upload_rejected")
    VERSION_SCAN_VERDICT = (2013, "version.scan_verdict")
    VERSION_TRUST_DECISION = (2014, "version.trust_decision")
    VERSION_DOWNLOAD = (2015, "version.download")
    REFERENCE_DOWNLOAD = (2016, "reference.download")
    TEAM_TRUSTED_TYPE_ADD = (2017, "team.trusted_type_add")
    VERSION_IMPORT_DUPLICATE = (2018, "version.import_duplicate")
    VERSION_TAGS_CHANGE = (2019, "version.tags_change")
    # 3000: deployments and traffic
    DEPLOYMENT_CREATE = (3001, "deployment.create")
    DEPLOYMENT_LIVE = (3002, "deployment.live")
    DEPLOYMENT_FAIL = (3003, "deployment.fail")
    TRAFFIC_SWITCH = (3011, "traffic.switch")
    FEEDBACK_RECEIVE = (3101, "feedback.receive")
    PREDICTION_PAYLOAD_VIEW = (3102, "prediction.payload_view")
    FEEDBACK_REFUSE = (3103, "feedback.refuse")
    # 3200: batch scoring
    BATCH_SUBMIT = (3201, "batch.submit")
    BATCH_CANCEL = (3202, "batch.cancel")
    BATCH_DONE = (3203, "batch.done")
    BATCH_FAIL = (3204, "batch.fail")
    BATCH_DOWNLOAD = (3205, "batch.download")
    BATCH_SCHEDULE_CREATE = (3211, "batch_schedule.create")
    BATCH_SCHEDULE_CHANGE = (3212, "batch_schedule.change")
    BATCH_SCHEDULE_DELETE = (3213, "batch_schedule.delete")
    # 3300: monitoring
    ALERT_FIRE = (3301, "alert.fire")
    ALERT_ACKNOWLEDGE = (3302, "alert.acknowledge")
    ALERT_RESOLVE = (3303, "alert.resolve")
    MONITORING_SETTINGS_CHANGE = (3311, "monitoring.settings_change")
    # 4000: promotion, approvals, rollback, notifications
    PROMOTION_REQUEST = (4001, "promotion.request")
    PROMOTION_APPROVE = (4002, "promotion.approve")
    PROMOTION_REJECT = (4003, "promotion.reject")
    PROMOTION_CANCEL = (4004, "promotion.cancel")
    PROMOTION_DEPLOY = (4005, "promotion.deploy")
    PROMOTION_LIVE = (4006, "promotion.live")
    PROMOTION_FAIL = (4007, "promotion.fail")
    PROMOTION_GATE_OVERRIDE = (4008, "promotion.gate_override")
    ENVIRONMENT_ROLLBACK = (4011, "environment.rollback")
    WEBHOOK_CREATE = (4021, "webhook.create")
    # 5000: data subjects
    GDPR_SUBJECT_ACCESS = (5001, "gdpr.subject_access")
    GDPR_ERASURE = (5002, "gdpr.erasure")
    RETENTION_PURGE = (5011, "retention.purge")
    RETENTION_DROP_PARTITION = (5012, "retention.drop_partition")
    PAYLOAD_KEYS_ROTATE = (5021, "payload_keys.rotate")
    # 1900: the audit trail itself
    AUDIT_VERIFY = (1901, "audit.verify")
    AUDIT_EXPORT = (1902, "audit.export")
    AUDIT_CHECKPOINT = (1903, "audit.checkpoint")

    def __init__(self, code: int, label: str) -> None:
        self.code = code
        self.label = label

    @classmethod
    def from_label(cls, label: str) -> AuditAction | None:
        return _BY_LABEL.get(label)


_BY_LABEL = {a.label: a for a in AuditAction}


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


# --- Verification -------------------------------------------------------------------------------------------------

_VERIFY_FIELDS = (
    "id",
    "seq",
    "timestamp",
    "actor_username",
    "action",
    "action_code",
    "target_type",
    "target_id",
    "target_repr",
    "team_slug",
    "before",
    "after",
    "metadata",
    "request_id",
    "ip",
    "user_agent",
    "outcome",
    "prev_hash",
    "hash",
)


def document_from_row(row: dict[str, Any]) -> dict[str, Any]:
    return event_document(
        seq=row["seq"],
        timestamp=row["timestamp"],
        actor_username=row["actor_username"],
        action=row["action"],
        action_code=row["action_code"],
        target_type=row["target_type"],
        target_id=row["target_id"],
        target_repr=row["target_repr"],
        team_slug=row["team_slug"],
        before=row["before"],
        after=row["after"],
        metadata=row["metadata"],
        request_id=row["request_id"],
        ip=row["ip"],
        user_agent=row["user_agent"],
        outcome=row["outcome"],
    )


@dataclass(frozen=True)
class ChainVerdict:
    ok: bool
    events: int
    head: str
    first_bad: int | None  # the event's seq
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "events": self.events, "head": self.head, "first_bad": self.first_bad,
                "reason": self.reason}


def _rows() -> Iterator[dict[str, Any]]:
    qs = AuditEvent.objects.order_by("seq").values(*_VERIFY_FIELDS)
    return qs.iterator(chunk_size=5000)


_PG_VERIFY_SQL = (
    "SELECT seq, to_char(timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), actor_username, action, "
    "action_code, target_type, target_id, target_repr, team_slug, before::text, after::text, metadata::text, "
    "request_id, host(ip), user_agent, outcome, prev_hash, hash FROM portal_auditevent ORDER BY seq"
)
_PG_KEYS = ("seq", "timestamp", "actor", "action", "action_code", "target_type", "target_id", "target_repr", "team",
            "before", "after", "metadata", "request_id", "ip", "user_agent", "outcome")


def _pg_verify() -> ChainVerdict:
    """verify_chain's fast path on PostgreSQL: rows as text from a server-side cursor, JSON parsed and written with
    orjson. A match is proof (orjson's output parses back to the same values, so equal bytes mean the canonical
    document); on a mismatch the event is recomputed the standard way before it is called altered."""
    import uuid

    import orjson

    loads, dumps, sort_keys, sha256 = orjson.loads, orjson.dumps, orjson.OPT_SORT_KEYS, hashlib.sha256
    expected_prev = GENESIS_HASH
    count = 0
    with transaction.atomic(), connection.connection.cursor(name=f"verify_{uuid.uuid4().hex}") as cursor:
        cursor.itersize = 10_000
        cursor.execute(_PG_VERIFY_SQL)
        for row in cursor:
            count += 1
            seq, prev_hash, stored = row[0], row[16], row[17]
            if seq != count:
                return ChainVerdict(False, count - 1, expected_prev, seq,
                                    f"event #{seq} follows #{count - 1}: events are missing or reordered")
            if prev_hash != expected_prev:
                return ChainVerdict(False, count - 1, expected_prev, seq,
                                    f"event #{seq} does not link to the event before it")
            before, after, metadata = row[9], row[10], row[11]
            document = {
                "seq": seq, "timestamp": row[1], "actor": row[2], "action": row[3], "action_code": row[4],
                "target_type": row[5], "target_id": row[6], "target_repr": row[7], "team": row[8],
                "before": None if before is None else loads(before), "after": None if after is None else loads(after),
                "metadata": None if metadata is None else loads(metadata), "request_id": row[12], "ip": row[13],
                "user_agent": row[14], "outcome": row[15],
            }
            try:
                digest = sha256(prev_hash.encode() + dumps(document, option=sort_keys)).hexdigest()
            except TypeError:
                digest = ""
            if digest != stored:
                values = list(row[:16])
                for i in (9, 10, 11):
                    values[i] = None if row[i] is None else json.loads(row[i])
                digest = chain_hash(expected_prev, dict(zip(_PG_KEYS, values, strict=True)))
                if digest != stored:
                    return ChainVerdict(False, count - 1, expected_prev, seq,
                                        f"event #{seq} was altered after it was written")
            expected_prev = digest
    return _head_verdict(count, expected_prev)


def _head_verdict(count: int, last_hash: str) -> ChainVerdict:
    head = AuditChainHead.objects.filter(pk=1).values("seq", "hash").first()
    if head is not None and (head["seq"] != count or head["hash"] != last_hash):
        return ChainVerdict(False, count, last_hash, count + 1,
                            f"the chain head says {head['seq']} events but {count} are present: the newest were removed")
    return ChainVerdict(True, count, last_hash, None)


def verify_chain(rows: Iterable[dict[str, Any]] | None = None) -> ChainVerdict:
    """Recompute every link; name the first event whose content, order or link does not hold."""
    if rows is None and connection.vendor == "postgresql":
        return _pg_verify()
    expected_prev = GENESIS_HASH
    count = 0
    for row in rows if rows is not None else _rows():
        count += 1
        seq = row["seq"]
        if seq != count:
            return ChainVerdict(False, count - 1, expected_prev, seq,
                                f"event #{seq} follows #{count - 1}: events are missing or reordered")
        if row["prev_hash"] != expected_prev:
            return ChainVerdict(False, count - 1, expected_prev, seq,
                                f"event #{seq} does not link to the event before it")
        digest = chain_hash(expected_prev, document_from_row(row))
        if digest != row["hash"]:
            return ChainVerdict(False, count - 1, expected_prev, seq,
                                f"event #{seq} was altered after it was written")
        expected_prev = digest
    if rows is None:
        return _head_verdict(count, expected_prev)
    return ChainVerdict(True, count, expected_prev, None)


def audit_chain_verify(*, actor: Any, source: str = "") -> TrailVerdict:
    """Verify the whole chain, compare it with the signed checkpoints kept outside the database, and record that it
    was verified, with the verdict (a failed check is an event too). See ``portal.audit_checkpoints``."""
    from portal.audit_checkpoints import audit_trail_verify

    return audit_trail_verify(actor=actor, source=source)
