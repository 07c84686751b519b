"""Verifiable exports of the audit trail: a ZIP streamed in constant memory, holding the events (CSV or JSON Lines),
``manifest.json`` and ``manifest.json.sig``, the manifest's Ed25519 signature.

Each exported event carries its ``prev_hash`` and ``hash``, so anyone can recompute
``sha256(prev_hash + canonical_json(event without prev_hash and hash))`` for every event, check that consecutive
events link, that the events file hashes to the manifest's ``events_sha256`` and that the signature holds for the
portal's public key (``scripts/verify_export.py`` does all of it without the portal).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from portal.audit import AuditAction, _VERIFY_FIELDS, audit_record, document_from_row
from portal.models import AuditChainHead

EXPORT_FORMATS = ("csv", "jsonl")
CSV_COLUMNS = ["seq", "timestamp", "actor", "action", "action_code", "target_type", "target_id", "target_repr",
               "team", "outcome", "request_id", "ip", "user_agent", "before", "after", "metadata", "prev_hash",
               "hash"]
JSON_COLUMNS = ("before", "after", "metadata")
FLUSH_BYTES = 256 * 1024


def signing_key() -> Ed25519PrivateKey:
    """The key that signs exports: ``PORTAL_AUDIT_SIGNING_KEY`` (PEM), else one generated once under ``var/``."""
    pem = settings.PORTAL_AUDIT_SIGNING_KEY
    if not pem:
        path = Path(settings.VAR_DIR) / "audit_signing_key.pem"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key = Ed25519PrivateKey.generate()
            data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        pem = path.read_text()
    loaded = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError("PORTAL_AUDIT_SIGNING_KEY must be an Ed25519 private key in PEM (PKCS#8)")
    return loaded


def public_key_pem() -> str:
    return signing_key().public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo).decode()


class _Sink(io.RawIOBase):
    """A write-only, non-seekable file for ZipFile whose bytes are taken out as they are written."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._size += len(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def pending(self) -> int:
        return self._size

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks, self._size = [], 0
        return data


def _dumps(value: Any) -> bytes:
    """Compact JSON; the verifier re-canonicalises what it parses, so the exported bytes need not be canonical."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits and the like
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _event_line(row: dict[str, Any], fmt: str, writer: Any, buffer: io.StringIO) -> bytes:
    document = {**document_from_row(row), "prev_hash": row["prev_hash"], "hash": row["hash"]}
    if fmt == "jsonl":
        return _dumps(document) + b"\n"
    values = {**document, **{k: _dumps(document[k]).decode() for k in JSON_COLUMNS}, "ip": document["ip"] or ""}
    buffer.seek(0)
    buffer.truncate()
    writer.writerow([values[c] for c in CSV_COLUMNS])
    return buffer.getvalue().encode()


def audit_export_stream(*, queryset: Any, fmt: str, filters: dict[str, Any], actor: Any) -> Iterator[bytes]:
    """Record the export, then yield the ZIP's bytes. Events are read in ``seq`` order up to the chain head as it
    stood when the export began (the export's own event included), in batches, so memory stays flat."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}")
    with transaction.atomic():
        event = audit_record(AuditAction.AUDIT_EXPORT, actor=actor,
                             metadata={"format": fmt, "filters": {k: str(v) for k, v in filters.items()}})
    head = AuditChainHead.objects.filter(pk=1).values("seq", "hash").first() or {"seq": 0, "hash": ""}
    key = signing_key()
    exported_at = timezone.now()
    rows = queryset.filter(seq__lte=head["seq"]).order_by("seq").values(*_VERIFY_FIELDS).iterator(chunk_size=2000)
    name = f"audit-events.{fmt}"
    return _zip_stream(rows, fmt, name, key, {
        "format": fmt, "events_file": name, "exported_at": exported_at.isoformat(),
        "exported_by": actor.get_username(), "export_event_seq": event.seq,
        "filters": {k: str(v) for k, v in filters.items()},
        "chain_head": {"seq": head["seq"], "hash": head["hash"]},
        "hash_rule": "hash = sha256_hex(prev_hash + canonical_json(event without prev_hash and hash)); "
                     "canonical_json = json.dumps(sort_keys=True, separators=(',', ':'), ensure_ascii=False)",
    })


def _zip_stream(rows: Iterator[dict[str, Any]], fmt: str, name: str, key: Ed25519PrivateKey,
                manifest: dict[str, Any]) -> Iterator[bytes]:
    sink = _Sink()
    digest = hashlib.sha256()
    count, first_hash, last_hash = 0, None, None
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as archive:
        with archive.open(name, "w", force_zip64=True) as events:
            if fmt == "csv":
                header = (",".join(CSV_COLUMNS) + "\n").encode()
                events.write(header)
                digest.update(header)
            for row in rows:
                line = _event_line(row, fmt, writer, text)
                events.write(line)
                digest.update(line)
                count += 1
                first_hash = first_hash or row["hash"]
                last_hash = row["hash"]
                if sink.pending() >= FLUSH_BYTES:
                    yield sink.take()
        manifest = {**manifest, "count": count, "first_hash": first_hash, "last_hash": last_hash,
                    "events_sha256": digest.hexdigest()}
        manifest_bytes = json.dumps(manifest, sort_keys=True, indent=2).encode()
        archive.writestr("manifest.json", manifest_bytes)
        archive.writestr("manifest.json.sig", base64.b64encode(key.sign(manifest_bytes)) + b"\n")
    yield sink.take()
