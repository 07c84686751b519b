"""Verifying the audit trail: the hash chain recomputed from the first event (:func:`verify_chain`), then compared
with the signed checkpoints kept outside the database (:func:`verify_audit_trail`, see
:mod:`portal.audit.checkpoints`); :func:`audit_chain_verify` does both and records that it was done, with the verdict.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction

from portal.audit import checkpoints
from portal.audit.actions import AuditAction
from portal.audit.record import GENESIS_HASH, audit_record, chain_hash, event_document
from portal.models import AuditChainHead, AuditEvent, AuditOutcome

logger = logging.getLogger(__name__)

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


# --- Verification against the checkpoints ----------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    kind: str
    message: str
    seq: int | None = None  # the event where the problem shows, when there is one
    checkpoint: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "seq": self.seq, "checkpoint": self.checkpoint}


@dataclass(frozen=True)
class TrailVerdict:
    """The chain's own verdict plus what the checkpoints say about it."""

    chain: ChainVerdict
    findings: tuple[Finding, ...] = ()
    newest: dict[str, Any] | None = None
    checkpoints: int = 0

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.findings

    @property
    def events(self) -> int:
        return self.chain.events

    @property
    def head(self) -> str:
        return self.chain.head

    @property
    def first_bad(self) -> int | None:
        if self.chain.first_bad is not None:
            return self.chain.first_bad
        seqs = [f.seq for f in self.findings if f.seq is not None]
        return min(seqs) if seqs else None

    @property
    def reason(self) -> str:
        return "; ".join([r for r in (self.chain.reason,) if r] + [f.message for f in self.findings])

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "events": self.events, "head": self.head, "first_bad": self.first_bad,
                "reason": self.reason, "problems": [f.as_dict() for f in self.findings],
                "checkpoints": self.checkpoints, "newest_checkpoint": self.newest}


def compare_with_checkpoints(chain: ChainVerdict) -> TrailVerdict:
    """What the checkpoints in the store say about the chain in the database (whose own verdict is ``chain``)."""
    findings: list[Finding] = []
    try:
        stored, unreadable = checkpoints.load_checkpoints()
    except Exception as exc:  # the store is down or refuses us: say so, never pass silently
        logger.exception("cannot read the audit checkpoints")
        return TrailVerdict(chain, (Finding("store_unreachable",
                                            f"the checkpoint store cannot be read: {type(exc).__name__}: {exc}"),))
    for name, why in unreadable:
        findings.append(Finding("checkpoint_unreadable", f"checkpoint file {name}: {why}"))

    valid: list[checkpoints.StoredCheckpoint] = []
    for checkpoint in stored:
        if checkpoints.signature_holds(checkpoint):
            valid.append(checkpoint)
        else:
            findings.append(Finding(
                "checkpoint_bad_signature",
                f"checkpoint #{checkpoint.number} ({checkpoint.name}) is not signed by the audit signing key: it was "
                f"replaced or forged", seq=checkpoint.seq, checkpoint=checkpoint.number))

    by_number = {c.number: c for c in stored}
    recorded = checkpoints.recorded_checkpoints()
    highest = max([0, *by_number, *(r["number"] for r in recorded)])
    for number in range(1, highest + 1):
        if number not in by_number:
            where = next((r for r in recorded if r["number"] == number), None)
            said = f", recorded in the trail at event #{where['event']}" if where else ""
            findings.append(Finding(
                "checkpoint_missing",
                f"checkpoint #{number} ({checkpoints.checkpoint_name(number)}{said}) is missing from the store: the checkpoint "
                f"chain has a gap", checkpoint=number))
    for number, checkpoint in sorted(by_number.items()):
        before = by_number.get(number - 1)
        expected_previous = GENESIS_HASH if number == 1 else before.digest if before else None
        if expected_previous is not None and checkpoint.body["previous"] != expected_previous:
            findings.append(Finding(
                "checkpoint_broken_link",
                f"checkpoint #{number} ({checkpoint.name}) does not link to checkpoint #{number - 1}: one of them "
                f"was replaced", checkpoint=number))
    for entry in recorded:
        held = by_number.get(entry["number"])
        if held is not None and entry["sha256"] and held.digest != entry["sha256"]:
            findings.append(Finding(
                "checkpoint_replaced",
                f"checkpoint #{entry['number']} ({held.name}) differs from the one the trail recorded at "
                f"event #{entry['event']}: it was replaced", checkpoint=entry["number"]))

    findings += _compare_events(valid)
    newest = valid[-1].summary() if valid else None
    return TrailVerdict(chain, tuple(findings), newest, len(stored))


def _compare_events(valid: list[checkpoints.StoredCheckpoint]) -> list[Finding]:
    """Each signed checkpoint's (seq, head hash) against the event the chain holds at that seq: the first
    checkpoint that disagrees, and where (after the last one that still agrees); and a head that went backwards."""
    if not valid:
        return []
    present: dict[int, str] = {}
    seqs = sorted({c.seq for c in valid if c.seq > 0})
    for start in range(0, len(seqs), 1000):
        present.update(AuditEvent.objects.filter(seq__in=seqs[start:start + 1000]).values_list("seq", "hash"))
    last_seq = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first() or 0
    findings: list[Finding] = []
    agreeing: checkpoints.StoredCheckpoint | None = None
    for checkpoint in valid:
        seq, recorded = checkpoint.seq, checkpoint.body["head_hash"]
        held = present.get(seq) if seq > 0 else GENESIS_HASH
        if held == recorded:
            agreeing = checkpoint
            continue
        since = (f"after checkpoint #{agreeing.number} (event #{agreeing.seq}) still agrees"
                 if agreeing else "no earlier checkpoint agrees")
        low = (agreeing.seq + 1) if agreeing else 1
        if held is None and seq > last_seq:
            findings.append(Finding(
                "events_missing",
                f"events #{max(low, last_seq + 1)}–#{seq} are missing: checkpoint #{checkpoint.number} of "
                f"{checkpoint.body['time']} recorded the chain reaching event #{seq} (hash {recorded[:16]}…), the "
                f"chain now ends at #{last_seq}", seq=max(low, last_seq + 1), checkpoint=checkpoint.number))
        else:
            holds = f"holds {held[:16]}…" if held else "has no event there"
            findings.append(Finding(
                "chain_rewritten",
                f"the chain was changed between events #{low} and #{seq} ({since}): checkpoint "
                f"#{checkpoint.number} of {checkpoint.body['time']} recorded event #{seq} with hash "
                f"{recorded[:16]}…, the chain {holds}", seq=low, checkpoint=checkpoint.number))
        break
    newest = valid[-1]
    head = AuditChainHead.objects.filter(pk=1).values("seq", "hash").first()
    if head is not None and head["seq"] < newest.seq:
        findings.append(Finding(
            "head_went_backwards",
            f"the chain head went backwards: it says #{head['seq']}, but checkpoint #{newest.number} of "
            f"{newest.body['time']} recorded #{newest.seq}", seq=head["seq"] + 1, checkpoint=newest.number))
    return findings


def verify_audit_trail() -> TrailVerdict:
    """The chain recomputed, then compared with the checkpoints in the store."""
    return compare_with_checkpoints(verify_chain())


def audit_chain_verify(*, actor: Any, source: str = "") -> TrailVerdict:
    """Verify the chain and its checkpoints, and record that it was verified, with the verdict (a failed check is an
    event too)."""
    verdict = verify_audit_trail()
    metadata = verdict.as_dict()
    if source:
        metadata["source"] = source
    with transaction.atomic():
        audit_record(AuditAction.AUDIT_VERIFY, actor=actor, metadata=metadata,
                     outcome=AuditOutcome.SUCCESS if verdict.ok else AuditOutcome.FAILURE)
    return verdict
