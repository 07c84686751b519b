"""Monitoring's flusher: moves prediction records from serving's buffer into the prediction log, in bulk.

Nothing is lost when the flusher dies mid-way: records are moved atomically from the buffer to a processing list
(Redis LMOVE) before they are written, the processing list is written again on the next run, and rows are keyed by
prediction id so writing twice inserts once. In the embedded mode the outbox rows are deleted in the same
transaction that inserts them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import csv
import io

import orjson
from django.db import connection, transaction

from monitoring.models import PredictionLog
from monitoring.rollups import mark_dirty
from monitoring.sensitive import protect_row, sensitive_positions
from registry.models import PredictionOutbox
from registry.serving import buffer

BATCHES_PER_RUN = 500


def _rows(batch: dict[str, Any]) -> list[PredictionLog]:
    created = dt.datetime.fromtimestamp(batch["ts"], tz=dt.UTC)
    ids, inputs, outputs = batch["ids"], batch["inputs"], batch["outputs"] or [None] * len(batch["ids"])
    positions = sensitive_positions(batch["model"], batch["version"])
    if positions:  # personal and health columns never reach the database in clear
        inputs = [protect_row(row, positions) for row in inputs]
    subjects = batch.get("subjects") or [""] * len(ids)
    per_row = batch["latency_ms"] / max(len(ids), 1)
    return [PredictionLog(id=ids[i], model_name=batch["model"], version=batch["version"],
                          environment=batch["environment"], role=batch["role"], created_at=created,
                          latency_ms=per_row if len(ids) > 1 else batch["latency_ms"], inputs=inputs[i],
                          output=outputs[i] if i < len(outputs) else None, subject_hash=subjects[i] or "",
                          request_id=batch.get("request_id", ""), error=batch.get("error", ""),
                          shadow_of=(batch.get("shadow_of") or [""] * len(ids))[i])
            for i in range(len(ids))]


COLUMNS = ("id", "model_name", "version", "environment", "role", "created_at", "latency_ms", "inputs", "output",
           "subject_hash", "request_id", "error", "shadow_of")


TEXT_COLUMNS = ("id", "model_name", "environment", "role", "subject_hash", "request_id", "error", "shadow_of")


def write_batches(batches: list[dict[str, Any]]) -> int:
    """Insert the batches' rows, skipping ids already there. On PostgreSQL the rows go through COPY into a staging
    table and one INSERT … ON CONFLICT DO NOTHING (several times faster than multi-row INSERTs for batch jobs)."""
    rows = [row for batch in batches for row in _rows(batch)]
    with transaction.atomic():
        if connection.vendor == "postgresql" and len(rows) > 200:
            _copy(rows)
        else:
            PredictionLog.objects.bulk_create(rows, ignore_conflicts=True, batch_size=2000)
        mark_dirty((b["model"], b["environment"], dt.datetime.fromtimestamp(b["ts"], tz=dt.UTC)) for b in batches)
    return len(rows)


def _json(value: Any) -> str:
    return "" if value is None else orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _copy(rows: list[PredictionLog]) -> None:
    table = PredictionLog._meta.db_table
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for r in rows:  # empty unquoted fields are NULL in COPY's CSV format; JSON null is stored as SQL NULL, as the ORM does
        writer.writerow((r.id, r.model_name, r.version, r.environment, r.role, r.created_at.isoformat(), r.latency_ms,
                         _json(r.inputs), _json(r.output), r.subject_hash, r.request_id, r.error, r.shadow_of))
    out.seek(0)
    columns = ", ".join(COLUMNS)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS predlog_stage (LIKE {table}) ON COMMIT DELETE ROWS")
        cursor.copy_expert(f"COPY predlog_stage ({columns}) FROM STDIN WITH (FORMAT csv, FORCE_NOT_NULL "
                            f"({', '.join(TEXT_COLUMNS)}))", out)  # type: ignore[attr-defined]
        cursor.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM predlog_stage ON CONFLICT (id) DO NOTHING")
        cursor.execute("TRUNCATE predlog_stage")


def flush_predictions() -> int:
    """Drain the buffer once; returns how many predictions were written."""
    client = buffer.redis_client()
    if client is None:
        return _flush_outbox()
    written = 0
    # Leftovers of a flusher that died after moving but before writing.
    leftovers = client.lrange(buffer.PROCESSING_KEY, 0, -1)
    if leftovers:
        written += write_batches([orjson.loads(raw) for raw in leftovers])
        client.delete(buffer.PROCESSING_KEY)
    for _ in range(BATCHES_PER_RUN // 50):
        moved = []
        for _ in range(50):
            raw = client.lmove(buffer.REDIS_KEY, buffer.PROCESSING_KEY, "LEFT", "RIGHT")
            if raw is None:
                break
            moved.append(raw)
        if not moved:
            break
        written += write_batches([orjson.loads(raw) for raw in moved])
        client.delete(buffer.PROCESSING_KEY)
    return written


def _flush_outbox() -> int:
    written = 0
    while True:
        with transaction.atomic():
            pending = list(PredictionOutbox.objects.select_for_update(skip_locked=True).order_by("pk")[:200])
            if not pending:
                return written
            written += write_batches([p.payload for p in pending])
            PredictionOutbox.objects.filter(pk__in=[p.pk for p in pending]).delete()
