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
import logging
import uuid
import zipfile
from collections.abc import Iterator
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.db import connection, transaction
from django.utils import timezone

from portal.audit.actions import AuditAction
from portal.audit.checkpoints import audit_checkpoint_create
from portal.audit.record import audit_record
from portal.audit.signing import signing_key
from portal.audit.verify import _VERIFY_FIELDS, document_from_row
from portal.csv_safety import ESCAPE_RULE, neutralise_cell, neutralise_sql
from portal.models import AuditChainHead

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("csv", "jsonl")


def export_filename(fmt: str, when: Any) -> str:
    """The download's name: its format and the time to the millisecond, so a CSV and a JSON Lines export (or two of
    one format) made in the same second are not saved over each other."""
    return f"audit-export-{when.strftime('%Y%m%dT%H%M%S')}{when.microsecond // 1000:03d}Z-{fmt}.zip"
CSV_COLUMNS = ["seq", "timestamp", "actor", "action", "action_code", "target_type", "target_id", "target_repr",
               "team", "outcome", "request_id", "ip", "user_agent", "before", "after", "metadata", "prev_hash",
               "hash"]
JSON_COLUMNS = ("before", "after", "metadata")
FLUSH_BYTES = 256 * 1024
BATCH_ROWS = 5000



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
    writer.writerow([neutralise_cell(values[c]) for c in CSV_COLUMNS])
    return buffer.getvalue().encode()


def audit_export_stream(*, queryset: Any, fmt: str, filters: dict[str, Any], actor: Any) -> Iterator[bytes]:
    """Record the export, then yield the ZIP's bytes. Events are read in ``seq`` order up to the chain head as it
    stood when the export began (the export's own event included), in batches, so memory stays flat."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}")
    with transaction.atomic():
        event = audit_record(AuditAction.AUDIT_EXPORT, actor=actor,
                             metadata={"format": fmt, "filters": {k: str(v) for k, v in filters.items()}})
    checkpoint = _export_checkpoint(actor)
    head = AuditChainHead.objects.filter(pk=1).values("seq", "hash").first() or {"seq": 0, "hash": ""}
    key = signing_key()
    exported_at = timezone.now()
    name = f"audit-events.{fmt}"
    rows = queryset.filter(seq__lte=head["seq"]).order_by("seq")
    return _zip_stream(_pg_lines(rows, fmt) if connection.vendor == "postgresql" else _python_lines(rows, fmt),
                       fmt, name, key, {
        "format": fmt, "events_file": name, "exported_at": exported_at.isoformat(),
        "exported_by": actor.get_username(), "export_event_seq": event.seq,
        "filters": {k: str(v) for k, v in filters.items()},
        "chain_head": {"seq": head["seq"], "hash": head["hash"]},
        "hash_rule": "hash = sha256_hex(prev_hash + canonical_json(event without prev_hash and hash)); "
                     "canonical_json = json.dumps(sort_keys=True, separators=(',', ':'), ensure_ascii=False)",
        **({"csv_escape": ESCAPE_RULE} if fmt == "csv" else {}),
        "checkpoint": checkpoint,
    })


def _export_checkpoint(actor: Any) -> dict[str, Any] | None:
    """Every export first checkpoints the chain's head (the export's own event included) outside the database, so
    the trail as exported can never later shrink unnoticed. A store that refuses the checkpoint does not stop the
    export: it is logged, the manifest says ``"checkpoint": null``, and the next verification reports the store."""
    try:
        checkpoint = audit_checkpoint_create(reason="export", actor=actor)
    except Exception:
        logger.exception("the export's audit checkpoint could not be written")
        return None
    return checkpoint.summary() if checkpoint else None


def _python_lines(queryset: Any, fmt: str) -> Iterator[tuple[bytes, int, str, str]]:
    """Batches of events as (bytes, count, first hash, last hash), built in Python from the rows (any database)."""
    text = io.StringIO()
    # Text cells quoted: with "\n" line ends the csv module would leave a bare "\r" unquoted (readers end the row
    # there); PostgreSQL's COPY quotes such cells itself.
    writer = csv.writer(text, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    batch: list[bytes] = []
    hashes: list[str] = []
    for row in queryset.values(*_VERIFY_FIELDS).iterator(chunk_size=2000):
        batch.append(_event_line(row, fmt, writer, text))
        hashes.append(row["hash"])
        if len(batch) >= BATCH_ROWS:
            yield b"".join(batch), len(batch), hashes[0], hashes[-1]
            batch, hashes = [], []
    if batch:
        yield b"".join(batch), len(batch), hashes[0], hashes[-1]


# The same document as portal.audit.event_document, built by PostgreSQL itself: JSON values come out as jsonb's
# text (valid JSON, not canonical; the verifier re-canonicalises what it parses).
_PG_FIELDS = {
    "seq": "seq", "timestamp": "to_char(timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    "actor": "actor_username", "action": "action", "action_code": "action_code", "target_type": "target_type",
    "target_id": "target_id", "target_repr": "target_repr", "team": "team_slug", "outcome": "outcome",
    "request_id": "request_id", "ip": "host(ip)", "user_agent": "user_agent",
    "before": "COALESCE(before::text, 'null')", "after": "COALESCE(after::text, 'null')",
    "metadata": "COALESCE(metadata::text, 'null')", "prev_hash": "prev_hash", "hash": "hash",
}


def _pg_lines(queryset: Any, fmt: str) -> Iterator[tuple[bytes, int, str, str]]:
    """Batches of events as (bytes, count, first hash, last hash), PostgreSQL doing the formatting, read through a
    server-side cursor."""
    # The filters' own WHERE clause (a semi-join on a subquery would make PostgreSQL sort every row instead of
    # walking the seq index in order).
    where_sql, where_params = queryset.query.get_compiler(using=queryset.db).compile(queryset.query.where)
    where_sql = where_sql or "TRUE"
    params = list(where_params)
    if fmt == "jsonl":
        pairs = ", ".join(f"'{k}', {'(' + v + ')::jsonb' if k in JSON_COLUMNS else v}" for k, v in _PG_FIELDS.items())
        select = f"json_build_object({pairs})::text, hash"
    else:
        select = ", ".join(neutralise_sql(f"({_PG_FIELDS[c]})::text") for c in CSV_COLUMNS)
    # Qualified: an output column named "seq" (text in CSV) would otherwise decide the order.
    # Columns from _PG_FIELDS (constants); the WHERE clause is the ORM's own compilation, its values bound in params.
    sql = f"SELECT {select} FROM portal_auditevent WHERE {where_sql} ORDER BY portal_auditevent.seq"  # noqa: S608
    if fmt == "csv":
        yield from _pg_copy_csv(sql, params, where_sql)
        return
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    with transaction.atomic(), connection.connection.cursor(name=f"audit_export_{uuid.uuid4().hex}") as cursor:
        cursor.itersize = BATCH_ROWS
        cursor.execute(sql, params)
        while batch := cursor.fetchmany(BATCH_ROWS):
            if fmt == "jsonl":
                data = ("\n".join(line for line, _hash in batch) + "\n").encode()
            else:
                text.seek(0)
                text.truncate()
                writer.writerows(batch)
                data = text.getvalue().encode()
            yield data, len(batch), batch[0][-1], batch[-1][-1]


def _pg_copy_csv(sql: str, params: Any, where_sql: str) -> Iterator[tuple[bytes, int, str, str]]:
    """CSV straight from PostgreSQL's COPY, on its own connection in a thread, handed over through a bounded queue
    (so memory stays flat and the response streams). Count and first/last hash come from one cheap query: events
    up to the chain head never change, so both reads see the same rows."""
    import queue
    import threading

    raw = connection.get_new_connection(connection.get_connection_params())
    try:
        with raw.cursor() as cursor:
            cursor.execute(f"SELECT count(*), min(seq), max(seq) FROM portal_auditevent WHERE {where_sql}",  # noqa: S608 - the ORM's WHERE, values bound
                           params)
            count, low, high = cursor.fetchone()
            hashes = {}
            if count:
                cursor.execute("SELECT seq, hash FROM portal_auditevent WHERE seq IN (%s, %s)", [low, high])
                hashes = dict(cursor.fetchall())
            copy_sql = cursor.mogrify(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv)", params).decode()
        chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=16)

        class Writer(io.RawIOBase):
            """COPY writes row by row; rows are handed over in blocks of FLUSH_BYTES."""

            def __init__(self) -> None:
                self.parts: list[bytes] = []
                self.size = 0

            def writable(self) -> bool:
                return True

            def write(self, data: Any) -> int:
                self.parts.append(bytes(data))
                self.size += len(data)
                if self.size >= FLUSH_BYTES:
                    self.hand_over()
                return len(data)

            def hand_over(self) -> None:
                if self.parts:
                    chunks.put(b"".join(self.parts))
                    self.parts, self.size = [], 0

        def pump() -> None:
            try:
                writer = Writer()
                with raw.cursor() as cursor:
                    cursor.copy_expert(copy_sql, writer, size=FLUSH_BYTES)
                writer.hand_over()
                chunks.put(None)
            except BaseException as exc:  # handed to the consumer, which raises it
                chunks.put(exc)

        thread = threading.Thread(target=pump, name="audit-export-copy", daemon=True)
        thread.start()
        buffered: list[bytes] = []
        size = 0
        first = True
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            buffered.append(item)
            size += len(item)
            if size >= FLUSH_BYTES:
                yield b"".join(buffered), 0, hashes.get(low, "") if first else "", ""
                first, buffered, size = False, [], 0
        thread.join()
        yield b"".join(buffered), count, hashes.get(low, "") if first else "", hashes.get(high, "")
    finally:
        raw.close()


def _zip_stream(lines: Iterator[tuple[bytes, int, str, str]], fmt: str, name: str, key: Ed25519PrivateKey,
                manifest: dict[str, Any]) -> Iterator[bytes]:
    sink = _Sink()
    digest = hashlib.sha256()
    count, first_hash, last_hash = 0, None, None
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as archive:
        with archive.open(name, "w", force_zip64=True) as events:
            if fmt == "csv":
                header = (",".join(CSV_COLUMNS) + "\n").encode()
                events.write(header)
                digest.update(header)
            for data, n, first, last in lines:
                events.write(data)
                digest.update(data)
                count += n
                first_hash = first_hash or first or None
                last_hash = last or last_hash
                if sink.pending() >= FLUSH_BYTES:
                    yield sink.take()
        manifest = {**manifest, "count": count, "first_hash": first_hash, "last_hash": last_hash,
                    "events_sha256": digest.hexdigest()}
        manifest_bytes = json.dumps(manifest, sort_keys=True, indent=2).encode()
        archive.writestr("manifest.json", manifest_bytes)
        archive.writestr("manifest.json.sig", base64.b64encode(key.sign(manifest_bytes)) + b"\n")
    yield sink.take()
