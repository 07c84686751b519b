"""Signed chain-head checkpoints, kept outside the database.

A hash chain proves that nothing inside it changed; it cannot prove that nothing was cut off its end, nor that it
was not rebuilt from some point on, by whoever can write the table (a database superuser can switch the triggers
off). So every ``PORTAL_AUDIT_CHECKPOINT_MINUTES`` (beat) and at every export the head of the chain is written down
where the database's owner cannot rewrite it: a checkpoint file in the artifact store (``checkpoints/``; on S3 a
bucket with Object Lock, ``PORTAL_S3_CHECKPOINT_BUCKET``) and, when configured, POSTed to the compliance team's
webhook. One checkpoint is::

    {"checkpoint": {"format": "mlops-portal-audit-checkpoint/1", "number": n, "seq": s, "head_hash": h,
                    "time": "...Z", "previous": <sha256 of checkpoint n-1's canonical body, or 64 zeros>,
                    "reason": "scheduled" | "export", "public_key_sha256": ...},
     "signature": <base64 Ed25519 signature of canonical_json(checkpoint)>}

Checkpoints form a chain of their own (``previous``), numbered without gaps, and each is also recorded in the audit
trail (``audit.checkpoint``, with its number and digest), so a checkpoint file that goes missing is noticed even when
it was the newest. :func:`portal.audit.verify.verify_audit_trail` compares the chain with them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.db import connection, transaction
from django.dispatch import Signal

from portal.audit.actions import AuditAction
from portal.audit.record import GENESIS_HASH, Target, audit_record, canonical_json
from portal.audit.signing import public_key_fingerprint, signing_key
from portal.models import AuditChainHead, AuditEvent
from portal.webhook_policy import sign

logger = logging.getLogger(__name__)

FORMAT = "mlops-portal-audit-checkpoint/1"
PREFIX = "checkpoints"
NAME = re.compile(r"^(\d{12})\.json$")
REASONS = ("scheduled", "export")
_LOCK_KEY = 0x617564_6370  # pg_advisory_lock key: one checkpoint writer at a time
# Sent once a stored checkpoint's transaction commits, when PORTAL_AUDIT_CHECKPOINT_WEBHOOK_URL is set (``name``):
# portal.tasks hands it to the compliance webhook. A signal, so that this module needs nothing of the task module.
checkpoint_to_send = Signal()


class CheckpointError(Exception):
    """A checkpoint could not be written (the store refused it, or another writer took its number)."""


def checkpoint_storage() -> Storage:
    return storages["audit_checkpoints"]


def checkpoint_name(number: int) -> str:
    return f"{PREFIX}/{number:012d}.json"


def body_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()



@dataclass(frozen=True)
class StoredCheckpoint:
    name: str
    body: dict[str, Any]
    signature: str
    digest: str

    @property
    def number(self) -> int:
        return int(self.body["number"])

    @property
    def seq(self) -> int:
        return int(self.body["seq"])

    def summary(self) -> dict[str, Any]:
        return {"number": self.number, "seq": self.seq, "head_hash": self.body["head_hash"],
                "time": self.body["time"], "name": self.name, "sha256": self.digest}


def parse_checkpoint(name: str, data: bytes) -> StoredCheckpoint:
    """A checkpoint file's content; ValueError naming what is wrong with it."""
    try:
        document = json.loads(data)
        body, signature = document["checkpoint"], document["signature"]
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError("not a checkpoint of this format")
        for key, kind in (("number", int), ("seq", int), ("head_hash", str), ("time", str), ("previous", str)):
            if not isinstance(body.get(key), kind):
                raise ValueError(f"'{key}' is missing or of the wrong type")
        if not isinstance(signature, str):
            raise ValueError("'signature' is not text")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{name} is not a readable checkpoint: {exc}") from None
    return StoredCheckpoint(name=name, body=body, signature=signature, digest=body_digest(body))


def signature_holds(checkpoint: StoredCheckpoint) -> bool:
    try:
        signing_key().public_key().verify(base64.b64decode(checkpoint.signature, validate=True),
                                          canonical_json(checkpoint.body).encode())
    except (InvalidSignature, ValueError):
        return False
    return True


def _stored_names(storage: Storage) -> list[str]:
    try:
        _dirs, files = storage.listdir(PREFIX)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(f"{PREFIX}/{f}" for f in files if NAME.match(f))


def load_checkpoints() -> tuple[list[StoredCheckpoint], list[tuple[str, str]]]:
    """Every checkpoint in the store, by number, and the (name, reason) of files that are not readable ones."""
    storage = checkpoint_storage()
    found: list[StoredCheckpoint] = []
    unreadable: list[tuple[str, str]] = []
    for name in _stored_names(storage):
        with storage.open(name, "rb") as fh:
            data = fh.read()
        try:
            checkpoint = parse_checkpoint(name, data)
        except ValueError as exc:
            unreadable.append((name, str(exc)))
            continue
        if checkpoint_name(checkpoint.number) != name:
            unreadable.append((name, f"{name} holds checkpoint #{checkpoint.number}"))
            continue
        found.append(checkpoint)
    return sorted(found, key=lambda c: c.number), unreadable


def _newest_stored(storage: Storage) -> StoredCheckpoint | None:
    for name in reversed(_stored_names(storage)):
        with storage.open(name, "rb") as fh:
            data = fh.read()
        with contextlib.suppress(ValueError):
            return parse_checkpoint(name, data)
    return None


def recorded_checkpoints() -> list[dict[str, Any]]:
    """The checkpoints the audit trail says were written: (event seq, number, sha256), oldest first."""
    rows = AuditEvent.objects.filter(action=AuditAction.AUDIT_CHECKPOINT.label).order_by("seq").values_list(
        "seq", "metadata")
    recorded = []
    for seq, metadata in rows.iterator(chunk_size=2000):
        if isinstance(metadata, dict) and isinstance(metadata.get("number"), int):
            recorded.append({"event": seq, "number": metadata["number"], "sha256": metadata.get("sha256", ""),
                             "seq": metadata.get("seq")})
    return recorded


@contextlib.contextmanager
def _writer_lock() -> Iterator[None]:
    """One checkpoint writer at a time across processes (PostgreSQL: a session advisory lock, held outside any
    transaction, so audit writers never wait on the store). SQLite (one host) relies on the store's exclusive
    create instead."""
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [_LOCK_KEY])
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [_LOCK_KEY])


def audit_checkpoint_create(*, reason: str, actor: Any = None) -> StoredCheckpoint | None:
    """Write the next checkpoint of the chain's head to the store, record it in the trail and hand it to the
    compliance webhook. A scheduled checkpoint is skipped when nothing but the last checkpoint's own event was
    written since (an idle portal does not grow its trail by one event an hour)."""
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {REASONS}")
    storage = checkpoint_storage()
    with _writer_lock():
        newest = _newest_stored(storage)
        recorded = recorded_checkpoints()
        last_recorded = recorded[-1] if recorded else None
        head = AuditChainHead.objects.filter(pk=1).values("seq", "hash").first() or {"seq": 0, "hash": GENESIS_HASH}
        if reason == "scheduled" and newest is not None and last_recorded is not None \
                and last_recorded["number"] == newest.number and head["seq"] in (newest.seq, last_recorded["event"]):
            return None
        # The newer of what the store and the trail know: a checkpoint deleted from the store keeps its number
        # taken, so the gap it left stays visible.
        number, previous = 1, GENESIS_HASH
        if newest is not None:
            number, previous = newest.number + 1, newest.digest
        if last_recorded is not None and last_recorded["number"] >= number:
            number, previous = last_recorded["number"] + 1, str(last_recorded["sha256"])
        body = {
            "format": FORMAT, "number": number, "seq": head["seq"], "head_hash": head["hash"],
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "previous": previous, "reason": reason,
            "public_key_sha256": public_key_fingerprint(),
        }
        signature = base64.b64encode(signing_key().sign(canonical_json(body).encode())).decode()
        data = json.dumps({"checkpoint": body, "signature": signature}, sort_keys=True, indent=2).encode() + b"\n"
        name = checkpoint_name(number)
        if storage.exists(name):
            raise CheckpointError(f"{name} exists already: another writer took checkpoint #{number}")
        saved = storage.save(name, ContentFile(data))
        if saved != name:  # the store gave our file another name: someone wrote this number meanwhile
            storage.delete(saved)
            raise CheckpointError(f"{name} was written by another writer meanwhile")
        checkpoint = StoredCheckpoint(name=name, body=body, signature=signature, digest=body_digest(body))
        with transaction.atomic():
            audit_record(AuditAction.AUDIT_CHECKPOINT, actor=actor,
                         target=Target("auditcheckpoint", str(number), name),
                         metadata={"number": number, "seq": head["seq"], "head_hash": head["hash"],
                                   "sha256": checkpoint.digest, "name": name, "reason": reason})
            if settings.PORTAL_AUDIT_CHECKPOINT_WEBHOOK_URL:
                transaction.on_commit(lambda: checkpoint_to_send.send(sender=StoredCheckpoint, name=name))
    return checkpoint


def audit_checkpoint_send(*, name: str) -> int:
    """POST one checkpoint file, as stored, to ``PORTAL_AUDIT_CHECKPOINT_WEBHOOK_URL`` (signed with
    ``PORTAL_AUDIT_CHECKPOINT_WEBHOOK_SECRET`` like every webhook, when that is set). Returns the HTTP status;
    raises on a failure worth retrying."""
    import time
    import urllib.request


    with checkpoint_storage().open(name, "rb") as fh:
        body = fh.read()
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "mlops-portal-audit-checkpoint",
               "X-Portal-Event": "audit.checkpoint", "X-Portal-Timestamp": timestamp}
    secret = settings.PORTAL_AUDIT_CHECKPOINT_WEBHOOK_SECRET
    if secret:
        headers["X-Portal-Signature"] = sign(secret, timestamp, body)
    # An operator-configured http(s) URL (settings refuse other schemes).
    url = settings.PORTAL_AUDIT_CHECKPOINT_WEBHOOK_URL
    if not url:
        raise CheckpointError("PORTAL_AUDIT_CHECKPOINT_WEBHOOK_URL is not set")
    request = urllib.request.Request(url, data=body,  # noqa: S310
                                     headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return int(response.status)
